#!/usr/bin/env bash
# One device call: install, report backends, run the GPU tests, train dae-b for 200 steps on
# Fashion-MNIST and sample, then time training and sampling beside the yardstick.
# Expects .data/fashion-mnist and .yardstick carried into the checkout; logs under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 DIFFAE_FASHION_MNIST=$PWD/.data/fashion-mnist
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || tail -20 "$OUT/install.log"
python3 -m diffae info | tee "$OUT/info.txt"
# each GPU test file in its own process, so a crash names its file and spares the others
for f in tests/test_*.py; do
  timeout 300 python3 -m pytest "$f" -m gpu -o addopts="" -p no:cacheprovider -q -rs 2>&1 | tail -4 | sed "s|^|$f: |"
done 2>&1 | tee "$OUT/gpu_tests.log"
python3 benchmarks/bench_train.py run --preset dae-b --steps 200 --batch 128 --out "$OUT/dae-b" 2>&1 \
  | grep -v "^step" | tail -5 | tee "$OUT/dae-b-run.log"
cp "$OUT/dae-b/metrics.jsonl" "$OUT/dae-b-metrics.jsonl" 2>/dev/null; cp "$OUT/dae-b/samples.png" "$OUT/dae-b-samples.png" 2>/dev/null
rm -rf "$OUT/dae-b"
{
python3 benchmarks/bench_train.py throughput --preset dae-b --img 32 --channels 3 --batch 256 --out /tmp/bench 2>&1 | tail -2
python3 .yardstick/plain_dit.py train 2>&1 | tail -1
python3 -m diffae bench sample --preset dae-b --batch 1 64 --steps 10 2>&1 | tail -2
for i in 1 2; do python3 -m diffae bench sample --preset dae-b --batch 1 64 --steps 10 --compile --cuda-graph 2>&1 | tail -2; done
python3 .yardstick/plain_dit.py sample --batch 1 --graph 2>&1 | tail -1
python3 .yardstick/plain_dit.py sample --batch 64 2>&1 | tail -1
} | tee "$OUT/bench.log"
