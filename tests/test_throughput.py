"""Throughput options of the trainer, checked on the CPU: the loss compiles as one graph (no graph
breaks, Triton ops included), gradient accumulation and activation checkpointing leave the update
unchanged, the tri-state train.compile, clear errors, and the --profile window."""
import json
import os

import pytest
import torch

from diffae import ops
from diffae.cli import main
from diffae.config import Config, get_preset, resolve_compile, resolve_compile_mode
from diffae.data import synthetic
from diffae.engine import distributed
from diffae.engine.trainer import Trainer
from diffae.errors import ConfigError
from diffae.nn.autoencoder import DiffusionAutoencoder
from diffae.ops import _backend


def _model(cfg, seed=0):
    """A model whose zero-initialised layers (AdaLN-Zero gates, final layer) are random, so every
    block changes the output and gets gradients."""
    torch.manual_seed(seed)
    model = DiffusionAutoencoder(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _recording_aot_eager(targets: list):
    """aot_eager that appends the name of every function its graphs call to `targets`."""
    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)
    return backend


# --- torch.compile: one graph ------------------------------------------------------------------
@pytest.mark.parametrize("sets", [[], ["encoder.view_min_area=0.5", "encoder.view_flip=true"]],
                         ids=["x0", "views"])
def test_loss_compiles_without_graph_breaks_on_dae_tiny(sets):
    """fullgraph=True raises at the first graph break; the eager backend makes tracing the whole
    cost (no code generation), so this proves the training loss is one graph, cheaply; also with
    the encoder's views resampled inside the loss."""
    cfg = get_preset("dae-tiny").override(sets)
    model = _model(cfg)
    x0 = synthetic(n=4).images
    noise = model.draw_noise(4, "cpu", torch.Generator().manual_seed(0))
    assert ("view" in noise) == bool(sets)
    torch._dynamo.reset()
    out = torch.compile(model.loss, fullgraph=True, backend="eager")(x0, noise=noise)
    out.loss.backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    ref = model.loss(x0, noise=noise)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)
    for name, g in _grads(model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_nested_block_regions_give_the_same_loss_and_gradients(monkeypatch):
    """DIFFAE_NESTED_BLOCKS: every AdaLN block as one nested compile region.  The graph must call
    the region (invoke_subgraph) instead of inlining the blocks, and give the eager loss and
    gradients; the blocks' modulations are views of one tensor, which a region refuses unless
    they are copied."""
    from diffae.nn import layers
    cfg = get_preset("dae-tiny")
    model = _model(cfg)
    x0 = synthetic(n=4).images
    noise = model.draw_noise(4, "cpu", torch.Generator().manual_seed(0))
    targets = []
    recording_backend = _recording_aot_eager(targets)

    monkeypatch.setattr(layers, "NESTED_BLOCKS", True)
    torch._dynamo.reset()
    out = torch.compile(model.loss, fullgraph=True, backend=recording_backend)(x0, noise=noise)
    out.loss.backward()
    got = _grads(model)
    # the denoiser's blocks but its last (which hands the final layer its input) share a signature
    # and call the region; a signature met once is inlined
    assert sum("invoke_subgraph" in t for t in targets) >= cfg.model.depth - 1 >= 2
    model.zero_grad(set_to_none=True)
    ref = model.loss(x0, noise=noise)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)
    for name, g in _grads(model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_loss_with_triton_kernels_traces_as_one_graph(micro_cfg):
    """The same with the Triton backend forced (interpreted on the CPU) under bf16 autocast, so the
    AdaLN and attention kernels are in the graph: aot_eager also traces their backward."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = micro_cfg.override(["model.depth=1", "model.patch=7", "encoder.depth=1"])  # 16 tokens: fast interpreter
    model = _model(cfg).to(dev)
    x0 = synthetic(n=2).images.to(dev)
    noise = model.draw_noise(2, dev, torch.Generator(dev).manual_seed(0))
    targets = []
    recording_backend = _recording_aot_eager(targets)

    torch._dynamo.reset()
    _backend.triton_status()  # probed eagerly (an import is not traceable)
    saved = _backend.forced_backend()
    ops.set_backend("triton")
    try:
        with torch.autocast(dev, torch.bfloat16):
            out = torch.compile(model.loss, fullgraph=True, backend=recording_backend)(x0, noise=noise)
        out.loss.backward()
        got = _grads(model)
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, torch.bfloat16):
            ref = model.loss(x0, noise=noise)
        ref.loss.backward()
    finally:
        ops.set_backend(saved)
    assert any("diffae_triton.attention" in t for t in targets), targets
    assert any("diffae_triton.gated_residual" in t for t in targets), targets
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    for name, g in _grads(model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


# --- gradient accumulation and activation checkpointing ----------------------------------------
def test_two_micro_batches_give_the_update_of_one_batch(micro_cfg, tmp_path):
    cfg = micro_cfg.override(["encoder.latent=gaussian", "encoder.kl_weight=1e-3", "train.augment_flip=true"])

    def run(accum, out):  # one after the other: a Trainer seeds the global generator it draws from
        trainer = Trainer(cfg.override([f"train.grad_accum={accum}"]), synthetic(n=64), out, quiet=True)
        steps = []
        for _ in range(2):
            losses = trainer.train_step()
            steps.append((losses, _grads(trainer.model), {n: p.detach().clone() for n, p in
                                                           trainer.model.named_parameters()}))
        return steps

    for (la, ga, pa), (lb, gb, pb) in zip(run(1, tmp_path / "a"), run(2, tmp_path / "b")):
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-7)
        for name in ga:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-7, msg=name)
            torch.testing.assert_close(pa[name], pb[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("conditioning", ["adaln", "cross-attn"])
def test_activation_checkpointing_gives_the_same_gradients(micro_cfg, conditioning):
    cfg = micro_cfg.override([f"model.conditioning={conditioning}"])
    plain = _model(cfg)
    recomputed = _model(cfg.override(["model.activation_checkpointing=true"]))
    x0 = synthetic(n=4).images
    noise = plain.draw_noise(4, "cpu", torch.Generator().manual_seed(1))
    a, b = plain.loss(x0, noise=noise), recomputed.loss(x0, noise=noise)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    for (name, g), h in zip(_grads(plain).items(), _grads(recomputed).values()):
        torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-8, msg=name)


def test_activation_checkpointing_can_be_switched_on_resume(micro_cfg, tmp_path):
    Trainer(micro_cfg, synthetic(n=64), tmp_path, quiet=True).fit(steps=2)
    resumed = Trainer(micro_cfg.override(["model.activation_checkpointing=true"]), synthetic(n=64), tmp_path,
                      resume=True, quiet=True)
    assert resumed.step == 2
    resumed.fit(steps=3)


# --- options and their errors ------------------------------------------------------------------
def test_compile_is_tri_state_and_reads_old_configs():
    cfg = get_preset("dae-tiny")
    assert cfg.train.compile == "auto"
    assert resolve_compile("auto", "cuda") is True and resolve_compile("auto", "cpu") is False
    assert resolve_compile(True, "cpu") is True and resolve_compile("false", "cuda") is False
    for raw, want in (("true", True), ("off", False), ("auto", "auto")):
        assert cfg.override([f"train.compile={raw}"]).train.compile == want
    old = cfg.to_dict()
    old["train"]["compile"] = False  # configs (and checkpoints) from before "auto" hold a bool
    old["train"].pop("grad_accum")
    old["model"].pop("activation_checkpointing")
    back = Config.from_dict(json.loads(json.dumps(old)))
    assert back.train.compile is False and back.train.grad_accum == 1
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="train.compile='sometimes' is not valid"):
        cfg.override(["train.compile=sometimes"])
    assert cfg.train.compile_mode == "auto"
    assert cfg.override(["train.compile_mode=reduce-overhead"]).train.compile_mode == "reduce-overhead"
    # CUDA graphs where measured and tested: one CUDA process, one micro-batch per step
    assert resolve_compile_mode("auto", "cuda", False, 1) == "reduce-overhead"
    assert resolve_compile_mode("auto", "cuda", True, 1) == resolve_compile_mode("auto", "cuda", False, 2) == "default"
    assert resolve_compile_mode("auto", "cpu", False, 1) == "default"
    assert resolve_compile_mode("default", "cuda", False, 1) == "default"
    with pytest.raises(ConfigError, match="unknown train.compile_mode 'fast'"):
        cfg.override(["train.compile_mode=fast"])


def test_batches_that_do_not_split_are_refused():
    with pytest.raises(ConfigError, match="batch_size=16 is not divisible by train.grad_accum=3"):
        get_preset("dae-tiny").override(["train.batch_size=16", "train.grad_accum=3"])
    with pytest.raises(ConfigError, match="grad_accum must be >= 1"):
        get_preset("dae-tiny").override(["train.grad_accum=0"])
    world = distributed.World(rank=0, size=3)
    with pytest.raises(ConfigError, match=r"batch_size=16 is not divisible by world size 3 x train.grad_accum 2 = 6"):
        distributed.local_batch(16, world, 2)
    assert distributed.local_batch(24, world, 2) == 8


def test_cli_compile_flags_and_bad_profile_window(tmp_path, capsys):
    from diffae.cli import build_parser
    p = build_parser()
    assert p.parse_args(["train"]).compile is None
    assert p.parse_args(["train", "--compile"]).compile is True
    assert p.parse_args(["train", "--no-compile"]).compile is False
    assert p.parse_args(["train", "--profile"]).profile == "10:20"
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path), "--profile", "5:2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "diffae: error: --profile expects START:STOP steps with 0 <= START < STOP, got '5:2'"


MICRO = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.heads=2", "--set", "encoder.dim=32",
         "--set", "encoder.depth=1", "--set", "encoder.heads=2", "--set", "encoder.z_dim=8"]


def test_profile_writes_a_trace_and_prints_top_ops(tmp_path, capsys):
    from diffae import profiling
    try:
        code = main(["train", "--data", "synthetic", "--out", str(tmp_path), "--steps", "4", "--batch-size", "8",
                     "--prior-steps", "0", "--quiet", "--profile", "1:3", "--no-compile", *MICRO])
    finally:
        profiling.enable(False)
    assert code == 0
    err = capsys.readouterr().err
    assert "profile of steps 1..2; trace: " in err and "Self CPU" in err and "aten::" in err
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert any(e.get("name") == "forward" for e in trace["traceEvents"])  # the NVTX-named stages
    assert os.path.getsize(tmp_path / "metrics.jsonl") > 0
