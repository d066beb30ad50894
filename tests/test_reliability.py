"""Fault injection: kills, signals, non-finite steps, out of memory, full disks, two runs on one
directory, corrupt and hostile checkpoints.  Each test injects the fault and checks nothing is lost."""
import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from diffae.cli import main
from diffae.data import synthetic
from diffae.engine import checkpoint, lock
from diffae.engine.lock import RunLock, RunLockedError
from diffae.engine.trainer import NonFiniteError, Trainer
from diffae.errors import CheckpointError, OutputError

MICRO = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.heads=2", "--set", "model.patch=4",
         "--set", "encoder.dim=32", "--set", "encoder.depth=1", "--set", "encoder.heads=2",
         "--set", "encoder.patch=7", "--set", "encoder.z_dim=8", "--set", "train.warmup_steps=5"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _train_argv(out, steps, *extra):
    return ["train", "--data", "synthetic", "--out", str(out), "--steps", str(steps), "--batch-size", "8",
            "--prior-steps", "0", "--quiet", "--seed", "0", *MICRO, *extra]


def _one_line_error(capsys, code, argv) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    return err


def _tensors_equal(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# --- 1. kill at any moment ------------------------------------------------------------------
# A driver imports torch once and forks one child per run, so each of the many short runs costs
# a fork instead of a fresh interpreter and torch import; the children are real processes that
# run `diffae train` and are SIGKILLed from here.  The driver itself never runs a torch op, so no
# thread pool exists when it forks.
DRIVER = r"""
import json, os, sys
import torch
from diffae.cli import main
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd[0] == "run":
        log = os.open(cmd[2], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        pid = os.fork()
        if pid == 0:
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 70
            try:
                code = main(cmd[1])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(log)
        print(pid, flush=True)
    else:
        print(os.waitstatus_to_exitcode(os.waitpid(cmd[1], 0)[1]), flush=True)
"""


class _Driver:
    def __init__(self, log):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.log = str(log)
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def _ask(self, cmd) -> int:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, argv) -> int:
        return self._ask(["run", argv, self.log])

    def wait(self, pid, timeout=120) -> int:
        """The child's exit code (-9 when SIGKILLed); a child still running after `timeout`
        seconds is killed and fails the test, so a hang cannot stall CI."""
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        hung = _alive(pid)
        if hung:
            os.kill(pid, signal.SIGKILL)
        code = self._ask(["wait", pid])
        assert not hung, f"run {pid} did not finish in {timeout} s: {open(self.log).read()[-2000:]}"
        return code

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _last_step(metrics) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return -1
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return -1


def _alive(pid) -> bool:
    try:  # the child is a zombie (not reaped) once it exits: check its state, not just its pid
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc"), reason="needs fork and /proc")
def test_sigkill_at_random_moments_then_resume_gives_bit_identical_weights(tmp_path):
    steps, kills = 24, 8
    extra = ["--set", "train.log_every=1", "--set", "train.ckpt_every=1"]
    driver = _Driver(tmp_path / "log.txt")
    try:
        ref = driver.start(_train_argv(tmp_path / "ref", steps, *extra))
        assert driver.wait(ref) == 0, (tmp_path / "log.txt").read_text()
        run = tmp_path / "killed"
        rng = random.Random(int(os.environ.get("DIFFAE_KILL_SEED", "1234")))
        # kill points: after a random step has been logged plus a random fraction of a step (so in
        # the forward/backward, the optimizer, the EMA update or the checkpoint write), and one at a
        # random moment after start (while loading the checkpoint / building the model)
        targets = sorted(rng.sample(range(2, steps - 2), kills - 1))
        plan = [("step", s) for s in targets]
        plan.insert(rng.randrange(len(plan) + 1), ("start", rng.uniform(0.0, 0.3)))
        survived, torn_writes, resumed_from = 0, 0, []
        for kind, value in plan:
            argv = _train_argv(run, steps, *extra) + (["--resume"] if (run / "last.pt").exists() else [])
            pid = driver.start(argv)
            deadline = time.monotonic() + 60
            if kind == "start":
                time.sleep(value)
            else:
                while _last_step(run / "metrics.jsonl") < value and _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.08))  # about one step
            os.kill(pid, signal.SIGKILL)
            code = driver.wait(pid)
            if code == 0:  # finished before the kill landed: nothing to resume from
                continue
            assert code == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-2000:]
            torn_writes += bool(list(run.glob(".last.pt.*.tmp")))
            if (run / "last.pt").exists():  # whatever is there is complete and verifies
                resumed_from.append(int(checkpoint.load(run / "last.pt")["step"]))
            survived += 1
        pid = driver.start(_train_argv(run, steps, *extra, "--resume"))
        assert driver.wait(pid) == 0, (tmp_path / "log.txt").read_text()[-2000:]
    finally:
        driver.close()
    a, b = checkpoint.load(tmp_path / "ref" / "last.pt"), checkpoint.load(run / "last.pt")
    assert a["step"] == b["step"] == steps
    for key in ("model", "ema", "optimizer", "sampler", "rng"):
        _tensors_equal(a[key], b[key], key)
    assert not list(run.glob(".last.pt.*.tmp")) and not (run / "train.lock").exists()
    steps_logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))  # killed steps re-run, not logged twice
    print(f"kill plan {plan}\nkill points survived with bit-identical weights: {survived}/{len(plan)}; "
          f"killed during a checkpoint write: {torn_writes}; resumed from steps {resumed_from}")
    assert survived >= kills - 1


# --- 2. SIGINT / SIGTERM --------------------------------------------------------------------------
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, capsys, monkeypatch, signum, code):
    original = Trainer.train_step

    def step_then_signal(self):
        out = original(self)
        if self.step == 3:
            os.kill(os.getpid(), signum)  # delivered to the handler while the loop runs
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    before = signal.getsignal(signum)
    run = tmp_path / "run"
    err = _one_line_error(capsys, code, _train_argv(run, 50))
    name = signal.Signals(signum).name
    assert err == f"diffae: {name} received: stopped at step 3, checkpoint saved to {run / 'last.pt'}; " \
                  "continue with --resume", err
    assert checkpoint.load(run / "last.pt")["step"] == 3
    assert signal.getsignal(signum) is before and not (run / "train.lock").exists()
    monkeypatch.setattr(Trainer, "train_step", original)
    assert main(_train_argv(run, 5, "--resume")) == 0
    assert checkpoint.load(run / "last.pt")["step"] == 5


# --- 3. non-finite loss or gradients ---------------------------------------------------------------
def _inject_nan(trainer, bad_steps):
    """Steps (1-based) whose batch is poisoned with NaN, so loss and gradients are non-finite."""
    original = trainer.loss_fn

    def loss_fn(x0, *rest):
        return original(x0 * float("nan") if trainer.step + 1 in bad_steps else x0, *rest)
    trainer.loss_fn = loss_fn


def test_nonfinite_steps_are_skipped_and_counted(micro_cfg, tmp_path):
    cfg = micro_cfg.override(["train.log_every=4", "train.ckpt_every=4", "train.max_nonfinite_steps=3"])
    trainer = Trainer(cfg, synthetic(n=64), tmp_path, quiet=True)
    bad = {3, 4, 9}  # two episodes, each shorter than the limit
    _inject_nan(trainer, bad)
    inf_grad_step = 6  # finite loss, infinite gradient: caught too
    hook = trainer.params[0].register_hook(lambda g: g * float("inf") if trainer.step + 1 == inf_grad_step else g)
    trainer.fit(steps=2)
    snapshot = [p.clone() for p in trainer.model.state_dict().values()] + \
               [p.clone() for p in trainer.ema.state_dict().values()]
    opt_state = {k: v.clone() for k, v in trainer.opt.state[trainer.params[0]].items()}
    trainer.train_step()  # step 3: NaN
    after = list(trainer.model.state_dict().values()) + list(trainer.ema.state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after)), "a non-finite step changed the weights"
    _tensors_equal(opt_state, dict(trainer.opt.state[trainer.params[0]]), "optimizer state")
    trainer.fit(steps=12)
    hook.remove()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r.get("skipped_nonfinite", 0) for r in records}
    assert sum(skipped.values()) == len(bad) + 1 == trainer.nonfinite_total
    # the logged averages leave skipped steps out; an interval with none left logs null
    assert [r["step"] for r in records if r["loss"] is None] == [4]
    assert all(r["loss"] == r["loss"] for r in records)
    payload = checkpoint.load(tmp_path / "last.pt")
    assert payload["step"] == 12
    assert all(torch.isfinite(v).all() for v in payload["model"].values())


def test_too_many_nonfinite_steps_stop_and_keep_the_last_good_checkpoint(micro_cfg, tmp_path, capsys, monkeypatch):
    cfg = micro_cfg.override(["train.log_every=2", "train.ckpt_every=5", "train.max_nonfinite_steps=4"])
    trainer = Trainer(cfg, synthetic(n=64), tmp_path, quiet=True)
    trainer.fit(steps=5)
    good = (tmp_path / "last.pt").read_bytes()
    _inject_nan(trainer, set(range(7, 100)))
    with pytest.raises(NonFiniteError) as exc:
        trainer.fit(steps=30)
    msg = str(exc.value)
    assert "4 steps in a row had a non-finite loss or gradients" in msg and "train.max_nonfinite_steps=4" in msg
    assert f"the last good checkpoint is {tmp_path / 'last.pt'} (step 5)" in msg
    assert trainer.step == 10  # noticed at the first check after the limit (every log_every steps)
    assert (tmp_path / "last.pt").read_bytes() == good
    # the CLI prints it as one line and exits 2
    from diffae.nn.autoencoder import DiffusionAutoencoder
    original = DiffusionAutoencoder.loss
    monkeypatch.setattr(DiffusionAutoencoder, "loss", lambda self, x0, **kw: original(self, x0 * float("nan"), **kw))
    err = _one_line_error(capsys, 2, _train_argv(tmp_path / "cli", 40, "--set", "train.max_nonfinite_steps=3",
                                                 "--set", "train.log_every=5"))
    assert err.startswith("diffae: error: training stopped at step 5: 5 steps in a row") and \
        "no checkpoint was written" in err, err
    assert not (tmp_path / "cli" / "last.pt").exists()


# --- 4. out of memory ------------------------------------------------------------------------------
def test_out_of_memory_names_batch_size_and_preset(tmp_path, capsys, monkeypatch):
    original = Trainer.train_step

    def step(self):
        if self.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.2 GiB is free. Including non-PyTorch")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", step)
    run = tmp_path / "run"
    err = _one_line_error(capsys, 2, _train_argv(run, 10, "--set", "train.ckpt_every=2"))
    assert err.startswith("diffae: error: out of memory at step 3 (preset 'dae-tiny', batch size 8, on cpu): "
                          "CUDA out of memory; Tried to allocate 2.00 GiB; try --batch-size 4"), err
    for part in ("Tried to allocate 2.00 GiB", "--batch-size 4", "gradient accumulation", "activation checkpointing",
                 f"the last good checkpoint is {run / 'last.pt'} (step 2)"):
        assert part in err, (part, err)
    assert "capacity" not in err  # not the allocator's whole report
    assert checkpoint.load(run / "last.pt")["step"] == 2 and not (run / "train.lock").exists()


# --- 5. disk full / read-only ---------------------------------------------------------------------
@pytest.mark.parametrize("where, err, words", [
    ("os.replace", errno.ENOSPC, "no space left on device"),
    ("os.fsync", errno.ENOSPC, "no space left on device"),
    ("tempfile.mkstemp", errno.EROFS, "read-only file system"),
])
def test_full_or_read_only_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where, err, words):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"config": "{}", "model": {"w": torch.arange(10.0)}})
    before = path.read_bytes()
    module, name = where.split(".")

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(f"{module}.{name}", fail)
    with pytest.raises(OutputError) as exc:
        checkpoint.save(path, {"config": "{}", "model": {"w": torch.zeros(10)}})
    monkeypatch.undo()
    assert str(exc.value) == f"cannot write checkpoint {path}: {words}; the previous checkpoint is untouched"
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


def test_disk_full_during_training_is_one_clear_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        if str(dst).endswith("last.pt"):
            calls.append(dst)
        if len(calls) >= 2:  # the second checkpoint (step 4) finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    err = _one_line_error(capsys, 2, _train_argv(run, 6, "--set", "train.ckpt_every=2"))
    assert err == f"diffae: error: cannot write checkpoint {run / 'last.pt'}: no space left on device; " \
                  "the previous checkpoint is untouched"
    assert checkpoint.load(run / "last.pt")["step"] == 2
    assert not list(run.glob(".last.pt.*")) and not (run / "train.lock").exists()


# --- 6. two runs on one directory -----------------------------------------------------------------
HOLDER = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
          "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d\\nother-host\\n' % os.getpid()); "
          "print('held', flush=True); time.sleep(120)")


@pytest.mark.skipif(lock.fcntl is None, reason="flock is POSIX")
def test_second_run_on_the_same_directory_is_refused_naming_the_pid(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / "train.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = _one_line_error(capsys, 2, _train_argv(run, 3))
        assert f"{run} is in use by another diffae train run (pid {holder.pid} (other-host))" in err, err
        assert not (run / "last.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    # its owner is dead: the stale lock file (still naming that pid) is taken over
    assert str(holder.pid) in (run / "train.lock").read_text()
    assert main(_train_argv(run, 3)) == 0
    assert not (run / "train.lock").exists()  # released on exit


def test_pid_lock_fallback_takes_over_stale_locks(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "fcntl", None)  # as on a platform without flock
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "train.lock").write_text(f"{dead.pid}\n")
    with RunLock(tmp_path):
        assert (tmp_path / "train.lock").read_text().split()[0] == str(os.getpid())
        with RunLock(tmp_path):  # re-entrant in one process (the CLI and the trainer both take it)
            pass
        assert (tmp_path / "train.lock").exists()
    assert not (tmp_path / "train.lock").exists()
    (tmp_path / "train.lock").write_text(f"{os.getppid()}\nsomewhere\n")  # a live process
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()} \\(somewhere\\)"):
        RunLock(tmp_path).acquire()


# --- 7. corrupt, foreign, newer and hostile checkpoints ---------------------------------------------
def test_checkpoint_checksum_version_and_weights_only(tmp_path):
    path = tmp_path / "last.pt"
    payload = {"config": "{}", "model": {"w": torch.randn(64)}, "step": 1}
    checkpoint.save(path, payload)
    good = path.read_bytes()
    assert good[:8] == checkpoint.MAGIC and checkpoint.load(path)["step"] == 1
    for i in (60, len(good) // 2, len(good) - 30):  # one flipped bit anywhere in the payload
        bad = bytearray(good)
        bad[i] ^= 0x10
        path.write_bytes(bad)
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            checkpoint.load(path)
    path.write_bytes(good[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load(path)
    path.write_bytes(good[:8] + struct.pack("<I", checkpoint.FORMAT_VERSION + 1) + good[12:])
    with pytest.raises(CheckpointError, match="written by a newer diffae"):
        checkpoint.load(path)
    checkpoint.save(path, {**payload, "format": checkpoint.FORMAT_VERSION + 5})  # newer inside, valid outside
    with pytest.raises(CheckpointError, match="written by a newer diffae"):
        checkpoint.load(path)
    torch.save({"format": 1, **payload}, path)  # format 1: a bare torch.save, still readable
    assert checkpoint.load(path)["step"] == 1

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    header_ok = checkpoint.encode({"config": "{}", "model": {}, "evil": Hostile()})  # valid checksum
    path.write_bytes(header_ok)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load(path)
    assert not (tmp_path / "pwned").exists()  # weights_only: the payload never ran
