#!/usr/bin/env bash
# Second device call: kernel tests and benchmarks, the default dae-tiny run end to end
# (diffae train; diffae sample), compiled CUDA-graph sampling beside the yardstick.
set -uo pipefail
export PYTHONUNBUFFERED=1 DIFFAE_FASHION_MNIST=$PWD/.data/fashion-mnist
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-build-isolation --no-deps -e . > /tmp/install.log 2>&1 || tail -20 /tmp/install.log
for f in tests/test_adaln.py tests/test_attention.py tests/test_graphs.py; do
  timeout 240 python3 -m pytest "$f" -m gpu -o addopts="" -p no:cacheprovider -q 2>&1 | tail -3 | sed "s|^|$f: |"
done 2>&1 | tee "$OUT/gpu_tests.log"
timeout 200 python3 benchmarks/bench_adaln.py --out "$OUT" 2>&1 | tail -16
timeout 200 python3 benchmarks/bench_attention.py --out "$OUT" 2>&1 | tail -12
{
cd /tmp && timeout 150 python3 -m diffae train --out /tmp/tiny --quiet && cd - >/dev/null
timeout 60 python3 -m diffae sample --ckpt /tmp/tiny/last.pt --out "$OUT/tiny-samples.png" --n 64 --steps 20
timeout 60 python3 -m diffae reconstruct --ckpt /tmp/tiny/last.pt --out "$OUT/tiny-recon.png" --n 16 --steps 20
cp /tmp/tiny/last.pt "$OUT/tiny-last.pt"; cp /tmp/tiny/metrics.jsonl "$OUT/tiny-metrics.jsonl"
for i in 1 2; do timeout 200 python3 -m diffae bench sample --preset dae-b --batch 1 64 --steps 10 --compile --cuda-graph 2>&1 | tail -2; done
python3 .yardstick/plain_dit.py sample --batch 1 --graph 2>&1 | tail -1
python3 .yardstick/plain_dit.py sample --batch 64 2>&1 | tail -1
} 2>&1 | tee "$OUT/run.log"
