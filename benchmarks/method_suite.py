"""Train and evaluate the five method presets on Fashion-MNIST, concurrently, in one GPU call.

Trains all presets at once, evaluates all at once, and summarises against issue 3's targets:

    python3 benchmarks/method_suite.py --out /tmp/suite --minutes 4 --collect "$OUT"

--variant NAME=PRESET SECTION.FIELD=VALUE... adds a run of a preset with overrides beside the others,
so an ablation shares the call, the device and the time budget with its baseline.

Each preset trains in its own `python3 -m diffae train` process with train.max_minutes, so it stops
on time, saves last.pt and still fits its latent prior; all five share the one GPU at once, which
one of these small models alone would leave partly idle.  Then every checkpoint is evaluated, again five at once,
with a reduced `diffae eval` (EVAL_ARGS) sized to a few minutes.

Writes OUT/<preset>/ (the run, train.log, eval/, eval.log), OUT/summary.json (per preset: training,
the headline numbers, the targets met, the full eval results), OUT/summary.md, OUT/suite.log (these
progress lines, then the tail of every run's logs) and OUT/samples.png (one sample grid per preset
and setting).  --collect DIR copies just those four files into DIR, for a machine that hands back
only a few small files.  A preset that fails stays in the table with its error; the exit status is
1 when any did.

MFU in the runs' metrics.jsonl is inflated here: each process measured the GPU's peak while the
others were starting on it.  img/s is per process; suite.log also gives their sum.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import environment  # noqa: E402
from diffae.config import METHOD_PRESETS, get_preset  # noqa: E402
from diffae.data import fashion_mnist  # noqa: E402
from diffae.errors import DiffaeError  # noqa: E402
from diffae.eval import report  # noqa: E402
from diffae.eval.report import few_shot, num, pct  # noqa: E402
from diffae.eval.run import SECTIONS  # noqa: E402
from diffae.images import grid, save_png  # noqa: E402

# FD-FMNIST at 10 and 100 steps (the 10-vs-100 target) for DDIM and the few-step DPM-Solver++(2M);
# reconstruction at the target's 20 DDIM steps; the probes on the full splits (they are cheap)
EVAL_ARGS = ["--fd-steps", "10", "100", "--samplers", "ddim", "dpmpp2m", "--recon-steps", "20"]
FULL_EVAL_ARGS = ["--fd-n", "1000", "--recon-n", "500"]  # with --quick, eval's tiny sizes instead
# eager: five torch.compile runs at once would spend a good part of a few-minute budget compiling
TRAIN_SETS = ["train.compile=false"]
TRAIN_GRACE_MIN = 1.5  # beyond train.max_minutes: start-up, the last checkpoint and the latent prior
PROGRESS_S = 30
SHOWN_SAMPLES = {"samples_dpmpp2m_10.png": "DPM-Solver++(2M) 10 steps", "samples_ddim_100.png": "DDIM 100 steps"}
COLLECTED = ("summary.json", "summary.md", "suite.log", "samples.png")
LOG_TAIL = 40  # lines of each run's train.log and eval.log kept in suite.log


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="new or empty folder for the runs and the summary")
    ap.add_argument("--presets", nargs="+", choices=METHOD_PRESETS, default=list(METHOD_PRESETS))
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget of each preset (train.max_minutes)")
    ap.add_argument("--steps", type=int, default=None, help="at most this many steps (default: the preset's)")
    ap.add_argument("--prior-steps", type=int, default=None, help="latent-prior steps after training "
                    "(default: diffae train's)")
    ap.add_argument("--eval-minutes", type=float, default=3.0,
                    help="evaluations still running after this long are stopped (their finished sections are kept)")
    ap.add_argument("--eval-sections", nargs="+", choices=SECTIONS, default=None, help="default: all")
    ap.add_argument("--quick", action="store_true", help="diffae eval --quick: tiny subsets (smoke test)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config overrides for every preset's training")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME=PRESET [SECTION.FIELD=VALUE]",
                    help="one more run beside the presets: PRESET under the name NAME with these overrides "
                         "(on top of --set), for an ablation in the same call, e.g. "
                         "--variant mldae-enc8=mldae encoder.depth=8")
    ap.add_argument("--collect", default=None, help="copy summary.json, summary.md, suite.log, samples.png here")
    a = ap.parse_args(argv)
    a.runs = {p: (p, []) for p in a.presets}  # run name -> (preset, its own overrides)
    for name, *sets in a.variant:
        run, sep, preset = name.partition("=")
        if not sep or not run or preset not in METHOD_PRESETS:
            ap.error(f"--variant {name!r}: expected NAME=PRESET with PRESET one of {', '.join(METHOD_PRESETS)}")
        if run in a.runs:
            ap.error(f"--variant {run!r}: that name is already a run")
        a.runs[run] = (preset, sets)
    return a


def check(a, out: Path) -> None:
    """Everything that would make all five runs fail, refused before any starts (DiffaeError)."""
    if len(set(a.presets)) != len(a.presets):
        raise DiffaeError(f"--presets names a preset twice: {' '.join(a.presets)}")
    if not a.minutes > 0 or not a.eval_minutes > 0:
        raise DiffaeError(f"--minutes and --eval-minutes must be > 0, got {a.minutes:g} and {a.eval_minutes:g}")
    if a.steps is not None and a.steps < 1:
        raise DiffaeError(f"--steps must be >= 1, got {a.steps}")
    if a.prior_steps is not None and a.prior_steps < 0:
        raise DiffaeError(f"--prior-steps must be >= 0, got {a.prior_steps}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DiffaeError(f"{out} exists and is not an empty folder; choose a new --out")
    for preset, sets in a.runs.values():
        get_preset(preset).override(TRAIN_SETS + a.set + sets)  # ConfigError names a bad --set
    fashion_mnist("test")  # DataError says where the data was looked for


class Log:
    """Progress lines on stdout and in suite.log, each with the time since the start."""

    def __init__(self, path: Path):
        self.path, self.t0 = path, time.monotonic()

    def elapsed_min(self) -> float:
        return (time.monotonic() - self.t0) / 60

    def __call__(self, msg: str) -> None:
        s = int(time.monotonic() - self.t0)
        line = f"[suite {s // 60}m{s % 60:02d}s] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def run_concurrently(commands: dict[str, list[str]], logs: dict[str, Path], limit_s: float, status, log: Log) -> dict:
    """Start every command at once, report status(name, finished) every PROGRESS_S, stop what still
    runs after limit_s (SIGTERM first: a training run then saves its checkpoint).  Per name:
    returncode, wall_min, stopped_at_limit."""
    # the CPU side of five processes shares the cores: more threads each would only contend
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // len(commands))))
    start = time.monotonic()
    procs = {}
    for name, cmd in commands.items():
        log(f"start {name}: {shlex.join(cmd)}")
        with open(logs[name], "w") as f:
            procs[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    done: dict[str, dict] = {}

    def finish(name: str, stopped: bool) -> None:
        done[name] = {"returncode": procs[name].returncode, "wall_min": round((time.monotonic() - start) / 60, 2),
                      "stopped_at_limit": stopped}
        log(f"{name} {'stopped at the limit' if stopped else 'finished'}: exit {procs[name].returncode} "
            f"after {done[name]['wall_min']:.2f} min")

    next_report = start + PROGRESS_S
    try:
        while len(done) < len(procs):
            time.sleep(1)
            for name, p in procs.items():
                if name not in done and p.poll() is not None:
                    finish(name, False)
            if time.monotonic() - start > limit_s:
                running = [name for name in procs if name not in done]
                for name in running:
                    procs[name].terminate()
                for name in running:
                    try:
                        procs[name].wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        procs[name].kill()
                        procs[name].wait()
                    finish(name, True)
            if time.monotonic() >= next_report:
                log(" | ".join(status(name, name in done) for name in procs))
                next_report += PROGRESS_S
    finally:  # the suite itself interrupted: leave no run behind
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return done


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # the line being written right now
    return records


def steady_img_per_s(records: list[dict]) -> float | None:
    """Median over the log intervals after the first, which holds the kernels' compilation."""
    rates = [r["img_per_s"] for r in (records[1:] or records)]
    return round(statistics.median(rates), 1) if rates else None


def last_line(path: Path, prefix: str = "") -> str:
    if not path.exists():
        return ""
    lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip().startswith(prefix)]
    return lines[-1] if lines else ""


def failure(proc: dict | None, log_path: Path, limit_min: float) -> str | None:
    """None when the process succeeded, else one line: why (diffae's own error line when there is one)."""
    if proc is None:
        return "not run"
    if proc["stopped_at_limit"]:
        return f"stopped at the suite's {limit_min:g}-minute limit"
    if proc["returncode"] == 0:
        return None
    line = last_line(log_path, "diffae: ") or last_line(log_path) or "no output"
    return f"exit {proc['returncode']}: {line}"


def headline(r: dict) -> dict:
    """The numbers of the summary row from one results.json (None where not measured)."""
    reps = r.get("representation") or []
    # results from before the "kind" field list the code, then (time-dependent encoders) the multi-level code
    by_kind = {rep.get("kind", ("code", "multi_level")[min(i, 1)]): rep for i, rep in enumerate(reps)}

    def probe(kind: str) -> float | None:
        return by_kind[kind]["linear_probe"]["accuracy"] if kind in by_kind else None

    def shots(kind: str) -> dict | None:
        rep = by_kind.get(kind)
        return None if rep is None else {"mean": rep["few_shot"]["mean"], "std": rep["few_shot"]["std"]}

    best_t = max(r.get("detail_control") or [], key=lambda row: row["linear_probe"], default=None)
    recon = {row["steps"]: row for row in r.get("reconstruction") or []}
    fd10, fd100 = report.fd_at(r.get("generation"), 10), report.fd_at(r.get("generation"), 100)
    code = by_kind.get("code")
    readout = by_kind.get("denoiser", {}).get("readout")
    return {"linear_probe": probe("code"), "knn20": code["knn"]["accuracy"] if code else None,
            "few_shot": shots("code"),
            # time-dependent encoders: E(x0, t) concatenated over t, and the best single t of the detail sweep
            "multi_level_probe": probe("multi_level"), "multi_level_few_shot": shots("multi_level"),
            # the features the code is read from: reported, not counted for the targets (the code is the product)
            "pooled_probe": probe("pooled"), "pooled_few_shot": shots("pooled"),
            # the denoiser's own features, t and block chosen on held-out train (eval/readout.py)
            "denoiser_probe": probe("denoiser"), "denoiser_few_shot": shots("denoiser"),
            "denoiser_readout": None if readout is None else {"t": readout["t"], "blocks": readout["blocks"]},
            "best_t": None if best_t is None else {"t": best_t["t"], "linear_probe": best_t["linear_probe"]},
            "psnr_inverted_20": recon[20]["inverted_psnr"] if 20 in recon else None,
            "fd10": fd10, "fd100": fd100, "fd_ratio": fd10 / fd100 if fd10 is not None and fd100 else None}


TARGET_NOTES = ("linear probe >= 92 % and 10-shot >= 80 % (the best of E(x0), the multi-level code and the "
                "denoiser's features, whose t and block are chosen on held-out train; the best-t probe picks t "
                "on the test split and is not counted)",
                "FD-FMNIST at 10 steps <= 1.15 x at 100 steps", "PSNR >= 30 dB after 20-step DDIM inversion")


def targets(h: dict) -> dict:
    """Issue 3's targets: True / False, None when not measured.  The probe and 10-shot targets take
    the best of E(x0), the multi-level code and the denoiser readout, all fixed before testing (the
    readout on held-out train); the best single t is not used, being picked on the test split."""
    def best(*values):
        values = [v for v in values if v is not None]
        return max(values) if values else None

    probe = best(h["linear_probe"], h["multi_level_probe"], h.get("denoiser_probe"))
    shot = best(*(s["mean"] for s in (h["few_shot"], h["multi_level_few_shot"], h.get("denoiser_few_shot")) if s))
    return {"probe >= 92 %": None if probe is None else probe >= 0.92,
            "10-shot >= 80 %": None if shot is None else shot >= 0.80,
            "FD @10 within 15 % of @100": None if h["fd_ratio"] is None else h["fd_ratio"] <= 1.15,
            "PSNR @20 >= 30 dB": None if h["psnr_inverted_20"] is None else h["psnr_inverted_20"] >= 30.0}


def row_markdown(row: dict) -> str:
    h, t, tr = row["headline"], row["targets"], row["train"]
    met = [name for name, ok in t.items() if ok]
    measured = sum(ok is not None for ok in t.values())
    best_t = "-" if h["best_t"] is None else f"{pct(h['best_t']['linear_probe'])} (t = {h['best_t']['t']:g})"
    where = h.get("denoiser_readout")
    denoiser = "-" if h.get("denoiser_probe") is None else (
        f"{pct(h['denoiser_probe'])}, 10-shot {few_shot(h['denoiser_few_shot'])}"
        + (f" (t = {where['t']:g}, blocks {', '.join(map(str, where['blocks']))})" if where else ""))
    cells = [row["preset"], row["error"] or "ok", num(tr["steps"], "d"), num(tr["wall_min"], ".2f"),
             num(tr["img_per_s"], ".0f"), num(tr["final_loss"], ".4f"), pct(h["linear_probe"]), pct(h["knn20"]),
             few_shot(h["few_shot"]), best_t, pct(h["multi_level_probe"]), denoiser,
             num(h["psnr_inverted_20"], ".2f") + (" dB" if h["psnr_inverted_20"] is not None else ""),
             num(h["fd10"], ".3f"), num(h["fd100"], ".3f"), num(h["fd_ratio"], ".2f"),
             f"{', '.join(met) or 'none'} ({len(met)} of {measured} measured)" if measured else "-"]
    return "| " + " | ".join(cells) + " |"


def summary_markdown(summary: dict) -> str:
    o = summary["options"]
    lines = [f"# Method presets on Fashion-MNIST: {o['minutes']:g} minutes of training each, all at once",
             "", f"{summary['environment']['gpu']}, torch {summary['environment']['torch']}, "
             f"{summary['environment']['date']}; whole suite {summary['wall_min']:.1f} min.",
             f"Command: `{summary['environment']['command']}`",
             f"Training: `diffae train --set {' '.join(o['train_sets'])}`, the {len(o['presets'])} presets "
             "concurrently on one device; img/s is per process (median over log intervals after the first).",
             f"Evaluation: `diffae eval {' '.join(o['eval_args'])}`"
             + (" (QUICK: tiny subsets, not for reporting)" if o["quick"] else "") + ".", "",
             "| preset | status | steps | train min | img/s | final loss | linear probe | kNN-20 | 10-shot "
             "| best-t probe | multi-level probe | denoiser readout probe | PSNR inv. @20 | FD-FMNIST @10 | @100 "
             "| @10/@100 | targets met |",
             "|" + "---|" * 17]
    lines += [row_markdown(row) for row in summary["presets"]]
    variants = [row for row in summary["presets"] if row.get("sets")]
    if variants:
        lines += ["", "Variants: " + "; ".join(f"{row['preset']} = {row['base_preset']} with {' '.join(row['sets'])}"
                                             for row in variants) + "."]
    lines += ["", "Targets (issue 3): " + "; ".join(TARGET_NOTES) + ". FD-FMNIST is diffae's own Frechet distance "
              "(best of the samplers at each step count), not Inception FID.", ""]
    evaluated = [row["results"] for row in summary["presets"] if row["results"]]
    if evaluated:
        lines += ["## Every embedding", "", report.summary_markdown(evaluated)]
        detail = report.detail_markdown(evaluated)
        if detail:
            lines += ["## Detail control: linear probe of E(x0, t)", "", detail]
    if summary["samples_png"]:
        lines += [f"`samples.png`: one column per preset ({', '.join(o['presets'])}); rows: "
                  f"{', '.join(SHOWN_SAMPLES.values())}; grey: not sampled.", ""]
    return "\n".join(lines)


def combined_samples(runs: dict[str, Path], path: Path) -> Path | None:
    """One PNG: the sample grids of SHOWN_SAMPLES (rows) for every preset (columns)."""
    tiles = {}
    for name in SHOWN_SAMPLES:
        for preset, run in runs.items():
            png = run / "eval" / name
            if png.exists():
                tiles[name, preset] = np.asarray(Image.open(png).convert("L"))
    if not tiles:
        return None
    shape = next(iter(tiles.values())).shape
    blank = np.full(shape, 128, np.uint8)
    images = [tiles.get((name, preset), blank) for name in SHOWN_SAMPLES for preset in runs]
    images = [im if im.shape == shape else blank for im in images]
    x = torch.from_numpy(np.stack(images)).float()[:, None] / 127.5 - 1  # grid() takes [-1, 1]
    return save_png(grid(x, nrow=len(runs), pad=8), path)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out).resolve()
    try:
        check(a, out)
    except DiffaeError as exc:
        print(f"method_suite: error: {exc}", file=sys.stderr)
        return 2
    runs = {name: out / name for name in a.runs}
    for run in runs.values():
        run.mkdir(parents=True)
    log = Log(out / "suite.log")
    py = [sys.executable, "-m", "diffae"]
    train_sets = TRAIN_SETS + [f"train.max_minutes={a.minutes:g}"] + a.set
    train_args = (["--steps", str(a.steps)] if a.steps else []) \
        + (["--prior-steps", str(a.prior_steps)] if a.prior_steps is not None else [])
    train_cmds = {name: py + ["train", "--preset", a.runs[name][0], "--out", str(run), *train_args]
                  + [arg for s in train_sets + a.runs[name][1] for arg in ("--set", s)] for name, run in runs.items()}

    def train_status(p: str, finished: bool) -> str:
        rec = (read_metrics(runs[p] / "metrics.jsonl") or [None])[-1]
        state = "done" if finished else "running" if rec else "starting"
        return f"{p} {state}" + (f" step {rec['step']} {rec['img_per_s']:.0f} img/s" if rec else "")

    log(f"training {', '.join(runs)} for {a.minutes:g} min each, all at once")
    trained = run_concurrently(train_cmds, {p: run / "train.log" for p, run in runs.items()},
                               60 * (a.minutes + TRAIN_GRACE_MIN), train_status, log)
    rates = {p: steady_img_per_s(read_metrics(run / "metrics.jsonl")) for p, run in runs.items()}
    log("img/s per process: " + ", ".join(f"{p} {num(r, '.0f')}" for p, r in rates.items())
        + f"; together {sum(r or 0 for r in rates.values()):.0f}")

    eval_args = EVAL_ARGS + (["--quick"] if a.quick else FULL_EVAL_ARGS) \
        + (["--sections", *a.eval_sections] if a.eval_sections else [])
    ready = [p for p, run in runs.items() if (run / "last.pt").exists()]
    evaluated = {}
    if ready:
        log(f"evaluating {', '.join(ready)}, all at once")
        evaluated = run_concurrently(
            {p: py + ["eval", "--ckpt", str(runs[p] / "last.pt"), "--out", str(runs[p] / "eval"), *eval_args]
             for p in ready}, {p: runs[p] / "eval.log" for p in ready}, 60 * a.eval_minutes,
            lambda p, finished: f"{p} " + ("done" if finished else
                                           last_line(runs[p] / "eval.log", "[eval]").removeprefix("[eval] ")[:50]),
            log)

    rows = []
    for p, run in runs.items():
        records = read_metrics(run / "metrics.jsonl")
        results_path = run / "eval" / "results.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else None
        if results:
            results["preset"] = p  # a variant's tables name the run, not the preset it is built on
        train_error = failure(trained.get(p), run / "train.log", a.minutes + TRAIN_GRACE_MIN)
        eval_error = (failure(evaluated.get(p), run / "eval.log", a.eval_minutes) if p in ready
                      else "not evaluated: no checkpoint")
        errors = [f"{stage} {error}" for stage, error in (("training", train_error), ("eval", eval_error)) if error]
        h = headline(results or {})
        rows.append({
            "preset": p, "base_preset": a.runs[p][0], "sets": a.runs[p][1], "error": "; ".join(errors) or None,
            "train": {**(trained.get(p) or {}), "steps": records[-1]["step"] if records else None,
                      "final_loss": records[-1]["loss"] if records else None, "img_per_s": rates[p],
                      "time_budget_reached": bool(records and records[-1].get("time_budget_reached")),
                      "metrics": records},
            "eval": evaluated.get(p), "headline": h, "targets": targets(h), "results": results})
    samples_png = combined_samples(runs, out / "samples.png")
    summary = {"environment": environment(), "wall_min": round(log.elapsed_min(), 2),
               "options": {"presets": list(runs), "minutes": a.minutes, "steps": a.steps, "prior_steps": a.prior_steps,
                           "eval_minutes": a.eval_minutes,
                           "quick": a.quick, "train_sets": train_sets, "eval_args": eval_args},
               "samples_png": samples_png is not None, "presets": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    for row in rows:
        log(f"{row['preset']}: {row['error'] or 'ok'}")
    log(f"wrote {out / 'summary.json'} and {out / 'summary.md'}")
    with open(out / "suite.log", "a") as f:
        for p, run in runs.items():
            for name in ("train.log", "eval.log"):
                if (run / name).exists():
                    tail = (run / name).read_text(errors="replace").splitlines()[-LOG_TAIL:]
                    f.write(f"\n==> {p}/{name} (last {len(tail)} lines) <==\n" + "".join(x + "\n" for x in tail))
    if a.collect:
        dest = Path(a.collect)
        dest.mkdir(parents=True, exist_ok=True)
        for name in COLLECTED:
            if (out / name).exists():
                shutil.copy2(out / name, dest / name)
        log(f"copied {', '.join(n for n in COLLECTED if (out / n).exists())} to {dest}")
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
