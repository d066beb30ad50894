import copy
import importlib
import json

import pytest
import torch

from diffae.cli import main
from diffae.data import synthetic
from diffae.engine import checkpoint
from diffae.engine.pipeline import Pipeline
from diffae.engine.trainer import Trainer


def test_tiny_model_overfits_a_few_images(micro_cfg, tmp_path):
    cfg = micro_cfg.override(["train.batch_size=8", "train.ema_decay=0.9"])
    data = synthetic(n=8, seed=0)
    trainer = Trainer(cfg, data, tmp_path, quiet=True)
    trainer.fit(steps=150)
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "metrics.jsonl")]
    assert losses[-1] < 0.35 * losses[0], losses


def test_resume_gives_the_same_next_step_bit_for_bit(micro_cfg, tmp_path):
    data = synthetic(n=64)
    straight = Trainer(micro_cfg, data, tmp_path / "a", quiet=True)
    straight.fit(steps=6)
    straight.fit(steps=9)
    interrupted = Trainer(micro_cfg, data, tmp_path / "b", quiet=True)
    interrupted.fit(steps=6)  # writes last.pt at its final step
    resumed = Trainer(micro_cfg, data, tmp_path / "b", resume=True, quiet=True)
    assert resumed.step == 6
    resumed.fit(steps=9)
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    for p, q in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(p, q)


def test_ddim_inversion_reconstructs_a_trained_model(micro_cfg, tmp_path):
    data = synthetic(n=256)
    cfg = micro_cfg.override(["train.batch_size=32"])
    Trainer(cfg, data, tmp_path, quiet=True).fit(steps=250)
    pipe = Pipeline.from_checkpoint(tmp_path / "last.pt", "cpu")
    images = data.images[:8]
    inverted, m_inv = pipe.reconstruct(images, steps=20, invert=True)
    _, m_rand = pipe.reconstruct(images, steps=20, invert=False)
    assert m_inv["psnr"] > 25.0, m_inv
    assert m_inv["mse"] < m_rand["mse"] / 5, (m_inv, m_rand)


def test_checkpoint_holds_config_and_loads_weights_only(micro_cfg, tmp_path):
    Trainer(micro_cfg, synthetic(n=32), tmp_path, quiet=True).fit(steps=2)
    payload = checkpoint.load(tmp_path / "last.pt")
    assert set(payload) >= {"format", "config", "model", "ema", "optimizer", "step", "rng", "sampler"}
    assert checkpoint.config_of(payload) == micro_cfg
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_nvtx_ranges_can_be_switched_on(micro_cfg, tmp_path):
    from diffae import profiling
    profiling.enable(True)
    try:
        Trainer(micro_cfg, synthetic(n=32), tmp_path, quiet=True).fit(steps=1)
    finally:
        profiling.enable(False)
    assert profiling.enabled() is False


def test_time_budget_stops_like_the_last_step_then_the_prior_and_resume_follow(tmp_path, capsys):
    # 400 steps of dae-tiny take seconds on any CPU, far past a 0.3 s budget
    out = tmp_path / "run"
    argv = ["train", "--preset", "dae-tiny", "--data", "synthetic", "--out", str(out), "--batch-size", "8",
            "--prior-steps", "5"]
    assert main(argv + ["--steps", "400", "--set", "train.max_minutes=0.005"]) == 0
    payload = checkpoint.load(out / "last.pt")
    stopped = payload["step"]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < stopped < 400 and last["step"] == stopped and last["time_budget_reached"]
    assert "latent_prior" in payload  # the stage after training still ran
    assert f"stopped on the time budget (train.max_minutes=0.005) at step {stopped} of 400" in capsys.readouterr().err
    assert main(argv + ["--steps", str(stopped + 3), "--resume"]) == 0
    assert checkpoint.load(out / "last.pt")["step"] == stopped + 3


@pytest.mark.parametrize("setting", [False, True])
def test_training_chooses_whether_attention_autotunes(micro_cfg, tmp_path, monkeypatch, setting):
    # training takes the attention's fixed configs unless train.attn_autotune asks for tuning;
    # DIFFAE_ATTN_AUTOTUNE, when set, overrides both
    ops_attention = importlib.import_module("diffae.ops.attention")  # the module, not ops.attention
    monkeypatch.delenv("DIFFAE_ATTN_AUTOTUNE", raising=False)
    monkeypatch.setattr(ops_attention, "_autotune", None)
    assert ops_attention.attention_autotune()  # the default outside training
    Trainer(micro_cfg.override([f"train.attn_autotune={str(setting).lower()}"]), synthetic(n=32), tmp_path,
            quiet=True)
    assert ops_attention.attention_autotune() is setting
    monkeypatch.setenv("DIFFAE_ATTN_AUTOTUNE", "1")
    assert ops_attention.attention_autotune()


def test_batch_sampler_draws_each_epoch_on_its_device_and_resumes():
    from diffae.engine.trainer import BatchSampler
    g = torch.Generator().manual_seed(4)
    want = torch.cat([torch.randperm(10, generator=g)[:8] for _ in range(3)])  # 2 batches of 4 per epoch
    sampler = BatchSampler(10, 4, torch.Generator().manual_seed(4))
    got = [sampler.next() for _ in range(5)]
    state, rng = sampler.state_dict(), sampler.generator.get_state()  # the trainer saves both
    got.append(sampler.next())
    assert torch.equal(torch.cat(got), want)
    again = BatchSampler(10, 4, torch.Generator())
    again.generator.set_state(rng)
    again.load_state_dict(state)
    assert torch.equal(again.next(), got[-1])
    assert BatchSampler(10, 4, torch.Generator(), device="meta").next().device.type == "meta"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_training_step_never_waits_for_the_device(micro_cfg, tmp_path, mode):
    # a synchronising call in the step (a copy from pageable memory, .item()) stops the host from
    # queueing the next step while the GPU runs this one
    cfg = micro_cfg.override([f"train.compile_mode={mode}"])
    trainer = Trainer(cfg, synthetic(n=64), tmp_path, device="cuda", quiet=True)
    for _ in range(3):  # compile, autotune and allocator warm-up may synchronise
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_cuda_graph_training_follows_the_plain_compiled_run(micro_cfg, tmp_path):
    # compile_mode=reduce-overhead replays forward and backward as CUDA graphs: the same kernels on
    # the same inputs, so the same losses and weights step for step (up to Inductor's choices)
    runs = {}
    for mode in ("default", "reduce-overhead"):
        cfg = micro_cfg.override([f"train.compile_mode={mode}", "train.compile=true"])
        trainer = Trainer(cfg, synthetic(n=64), tmp_path / mode, device="cuda", quiet=True)
        losses = torch.stack([trainer.train_step()[0] for _ in range(8)]).cpu()
        runs[mode] = losses, torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).cpu()
        assert trainer.graphed == (mode == "reduce-overhead")
    (l0, w0), (l1, w1) = runs["default"], runs["reduce-overhead"]
    assert torch.isfinite(l1).all() and l1[-1] < l1[0]
    torch.testing.assert_close(l1, l0, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(w1, w0, rtol=1e-3, atol=1e-4)


def test_grad_clip_is_clip_grad_norm_inside_adamw(micro_cfg, tmp_path):
    """Clipping by fused AdamW's grad_scale must give clip_grad_norm_ followed by the step.  Checked
    at the second step: at the first, Adam's update does not depend on the gradients' scale."""
    trainer = Trainer(micro_cfg.override(["train.grad_clip=0.01"]), synthetic(n=32), tmp_path, quiet=True)
    trainer.fit(steps=1)
    real_step, expected = trainer.opt.step, {}

    def reference(clip: bool) -> list[torch.Tensor]:
        params = [p.detach().clone().requires_grad_() for p in trainer.params]
        for q, p in zip(params, trainer.params):
            q.grad = p.grad.clone()
        opt = torch.optim.AdamW(params, fused=True)
        # the same moments, lr and decay (a copy: loading may share the step counters)
        opt.load_state_dict(copy.deepcopy(trainer.opt.state_dict()))
        if clip:
            assert torch.nn.utils.clip_grad_norm_(params, 0.01) > 0.01  # clipping engages
        opt.step()
        return params

    def step():
        expected["clipped"], expected["unclipped"] = reference(True), reference(False)
        real_step()
    trainer.opt.step = step
    trainer.train_step()
    for p, c, u in zip(trainer.params, expected["clipped"], expected["unclipped"]):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-5, atol=1e-7)
    moved = [(c - u).abs().max().item() for c, u in zip(expected["clipped"], expected["unclipped"])]
    assert max(moved) > 1e-5  # the test would see clipping dropped
