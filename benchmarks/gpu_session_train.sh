#!/usr/bin/env bash
# Training throughput targets, one stage per device call (each well under 10 minutes):
#   bash benchmarks/gpu_session_train.sh tests   # GPU run of the new tests (any GPU kind)
#   bash benchmarks/gpu_session_train.sh b       # dae-b 32x32x3 batch 256, compiled: img/s, MFU, compile s,
#                                                # peak memory, and the compiled yardstick in the same call
#   bash benchmarks/gpu_session_train.sh l       # dae-l 64x64x3 batch 32, the same
#   bash benchmarks/gpu_session_train.sh ddp     # on nvidia-h200-x2: dae-b batch 256 over 2 GPUs (torchrun),
#                                                # 1 GPU beside it, then sharded (FSDP2), the CLI under torchrun
#                                                # (MFU in metrics.jsonl)
#   bash benchmarks/gpu_session_train.sh profile # top kernels of a compiled dae-b step, Chrome trace
# Expects .yardstick (and .data/fashion-mnist for ddp) carried into the checkout; results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 DIFFAE_FASHION_MNIST=$PWD/.data/fashion-mnist
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || tail -20 "$OUT/install.log"
B="--preset dae-b --img 32 --channels 3 --batch 256"
case "${1:-b}" in
  tests)
    timeout 500 python3 -m pytest tests/test_throughput.py tests/test_flops.py tests/test_distributed.py \
      -o addopts="" -p no:cacheprovider -q 2>&1 | tail -5 | tee "$OUT/tests.log" ;;
  b)
    timeout 560 python3 benchmarks/bench_train.py throughput $B --results "$OUT" 2>&1 | grep -v "^W" | tee "$OUT/b.log" ;;
  l)
    timeout 560 python3 benchmarks/bench_train.py throughput --preset dae-l --img 64 --channels 3 --batch 32 \
      --results "$OUT" 2>&1 | grep -v "^W" | tee "$OUT/l.log" ;;
  ddp)
    timeout 240 torchrun --standalone --nproc-per-node 2 benchmarks/bench_train.py throughput $B --no-yardstick \
      --results "$OUT" 2>&1 | grep "^{\|wrote" | tee "$OUT/ddp.log"
    timeout 150 python3 benchmarks/bench_train.py throughput $B --no-yardstick --results "$OUT" 2>&1 \
      | grep "^{\|wrote" | tee -a "$OUT/ddp.log"
    timeout 240 torchrun --standalone --nproc-per-node 2 benchmarks/bench_train.py throughput $B --no-yardstick \
      --data-parallel fsdp --results "$OUT" 2>&1 | grep "^{\|wrote" | tee -a "$OUT/ddp.log"
    timeout 180 torchrun --standalone --nproc-per-node 2 -m diffae train --preset dae-b --steps 300 --batch-size 256 \
      --prior-steps 0 --out /tmp/ddp-run --set train.log_every=50 2>&1 | grep -v "^\[rank" | tail -8 | tee -a "$OUT/ddp.log"
    cp /tmp/ddp-run/metrics.jsonl "$OUT/ddp-metrics.jsonl" 2>/dev/null ;;
  profile)
    timeout 400 python3 benchmarks/profile_train.py $B --out /tmp/prof --rows 30 > "$OUT/profile.txt" 2>&1
    tail -40 "$OUT/profile.txt"; gzip -c /tmp/prof/trace.json > "$OUT/trace.json.gz" ;;
esac
