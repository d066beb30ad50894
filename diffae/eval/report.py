"""results.json and results.md of one evaluation, and a summary table across runs.

    python -m diffae.eval.report runs/*/eval      # one markdown row per run's results.json,
                                                  # then detail control across runs
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

from ..errors import OutputError


def _clean(obj):
    """JSON-safe: non-finite floats become None (json would write the non-standard Infinity/NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def write(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    _write_text(out / "results.json", json.dumps(_clean(results), indent=1) + "\n")
    _write_text(out / "results.md", markdown(results))
    return out / "results.json", out / "results.md"


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def few_shot(fs: dict | None) -> str:
    """'mean ± std %' of a few-shot record ({'mean', 'std'}), '-' when missing."""
    return "-" if not fs else f"{100 * fs['mean']:.2f} ± {100 * fs['std']:.2f} %"


def num(v, fmt: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return format(v, fmt)


def _rep_rows(results: dict) -> list[str]:
    rows = []
    for rep in results.get("representation", []):
        few = few_shot(rep.get("few_shot"))
        lp = rep.get("linear_probe") or {}
        rows.append(f"| {rep['name']} | {rep['dim']} | {pct(lp.get('accuracy'))} | {num(lp.get('l2'), 'g')} | "
                    f"{pct((rep.get('knn') or {}).get('accuracy'))} | {few} |")
    return rows


def markdown(r: dict) -> str:
    lines = [f"# Evaluation: {r.get('preset', '?')} ({r.get('checkpoint', '?')})", ""]
    lines.append(f"Step {r.get('step', '?')}, device {r.get('device', '?')}, data {r.get('data', {}).get('name', '?')}"
                 f"{', QUICK (tiny subsets: not for reporting)' if r.get('quick') else ''}.")
    lines.append("")
    if r.get("representation"):
        d = r.get("data", {})
        lines += ["## Representation", "",
                  f"Frozen embeddings; {d.get('n_train', '?')} train / {d.get('n_test', '?')} test images. "
                  "Linear probe: logistic regression, L2 chosen on 10 % of train held out. "
                  "kNN: cosine, k = 20. Few-shot: 10 labels per class, mean ± std over 5 draws.", "",
                  "| embedding | dim | linear probe | L2 | kNN-20 | 10-shot |", "|---|---|---|---|---|---|"]
        lines += _rep_rows(r) + [""]
    elif r.get("representation_skipped"):
        lines += ["## Representation", "", f"Skipped: {r['representation_skipped']}", ""]
    if r.get("detail_control"):
        lines += ["## Detail control: what E(x0, t) keeps as a function of t", "",
                  f"Training noise range: {r.get('training_noise', '?')}.", "",
                  "| t | linear probe | kNN-20 |", "|---|---|---|"]
        for row in r["detail_control"]:
            lines.append(f"| {row['t']:g} | {pct(row['linear_probe'])} | {pct(row['knn'])} |")
        lines.append("")
    if r.get("reconstruction"):
        n = r["reconstruction"][0]["n"]
        lines += ["## Reconstruction", "",
                  f"{n} test images; deterministic DDIM; MSE on [0, 1]; PSNR = 10 log10(1 / mean MSE) "
                  "(per-image mean in the JSON). Inverted: x_T from DDIM inversion. Random: fresh x_T, "
                  "so only z carries the image.", "",
                  "| DDIM steps | inverted MSE | inverted PSNR | random-x_T MSE | random-x_T PSNR |",
                  "|---|---|---|---|---|"]
        for row in r["reconstruction"]:
            lines.append(f"| {row['steps']} | {num(row['inverted_mse'], '.3e')} | {num(row['inverted_psnr'], '.2f')} dB"
                         f" | {num(row['random_mse'], '.3e')} | {num(row['random_psnr'], '.2f')} dB |")
        lines.append("")
    gen = r.get("generation")
    if gen:
        lines += ["## Generation: FD-FMNIST", ""]
        if gen.get("skipped"):
            lines += [f"Skipped: {gen['skipped']}", ""]
        else:
            lines += [f"FD-FMNIST is a Frechet distance in the 128-d features of diffae's own small "
                      f"Fashion-MNIST classifier (test accuracy {pct(gen.get('classifier_test_accuracy'))}); "
                      "it is NOT Inception FID and compares only with FD-FMNIST at the same N. "
                      f"{gen['n']} samples against the {gen['reference']}; z from {gen['z_source']}. "
                      f"Floor: {gen['n']} real train images score {num(gen.get('real_floor'), '.3f')}.", ""]
            if gen.get("note"):
                lines += [f"Note: {gen['note']}", ""]
            steps = sorted({row["steps"] for row in gen["rows"]})
            lines += ["| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |",
                      "|---|" + "---|" * len(steps)]
            for sampler in dict.fromkeys(row["sampler"] for row in gen["rows"]):
                vals = {row["steps"]: row["fd"] for row in gen["rows"] if row["sampler"] == sampler}
                lines.append(f"| {sampler} | " + " | ".join(num(vals.get(s), ".3f") for s in steps) + " |")
            lines.append("")
    if r.get("files"):
        lines += ["## Files", ""] + [f"- `{f}`" for f in r["files"]] + [""]
    if r.get("timings_s"):
        lines += ["Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items()), ""]
    return "\n".join(lines)


# --- across runs --------------------------------------------------------------------------------
def fd_at(gen: dict | None, steps: int) -> float | None:
    """FD-FMNIST at `steps` sampling steps, the best over the samplers evaluated; None when not measured."""
    if not gen or gen.get("skipped"):
        return None
    vals = [row["fd"] for row in gen["rows"] if row["steps"] == steps]
    return min(vals) if vals else None


def summary_markdown(results: list[dict]) -> str:
    """One row per run: the headline numbers of the issue's targets."""
    lines = ["| preset | embedding | linear probe | kNN-20 | 10-shot | PSNR inv. @20 | FD-FMNIST @10 (best sampler) "
             "| @100 | @10 / @100 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        gen = r.get("generation")
        rec = {row["steps"]: row for row in r.get("reconstruction", [])}
        psnr = num(rec[20]["inverted_psnr"], ".2f") + " dB" if 20 in rec else "-"
        fd10, fd100 = fd_at(gen, 10), fd_at(gen, 100)
        ratio = "-" if fd10 is None or not fd100 else f"{fd10 / fd100:.2f}"
        for i, rep in enumerate(r.get("representation", []) or [{"name": "-"}]):
            few = few_shot(rep.get("few_shot"))
            lines.append(f"| {r.get('preset', '?')} | {rep['name']} | {pct((rep.get('linear_probe') or {}).get('accuracy'))} "
                         f"| {pct((rep.get('knn') or {}).get('accuracy'))} | {few} | "
                         + (f"{psnr} | {num(fd10, '.3f')} | {num(fd100, '.3f')} | {ratio} |" if i == 0 else "| | | |"))
    return "\n".join(lines) + "\n"


def detail_markdown(results: list[dict]) -> str:
    """Detail control across runs (e.g. `drl` trained on different noise ranges): linear-probe
    accuracy of E(x0, t) per t, one row per run with a time-dependent encoder."""
    runs = [r for r in results if r.get("detail_control")]
    if not runs:
        return ""
    ts = sorted({row["t"] for r in runs for row in r["detail_control"]})
    lines = ["| preset | training noise | " + " | ".join(f"t = {t:g}" for t in ts) + " |",
             "|---|---|" + "---|" * len(ts)]
    for r in runs:
        acc = {row["t"]: row["linear_probe"] for row in r["detail_control"]}
        lines.append(f"| {r.get('preset', '?')} | {r.get('training_noise', '?')} | "
                     + " | ".join(pct(acc.get(t)) for t in ts) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    results = []
    for p in paths:
        f = p / "results.json" if p.is_dir() else p
        results.append(json.loads(f.read_text()))
    print(summary_markdown(results), end="")
    detail = detail_markdown(results)
    if detail:
        print("\nDetail control (linear probe of E(x0, t)):\n\n" + detail, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
