#!/usr/bin/env bash
# One device call per stage, each ending well inside 10 minutes; logs and JSON under $OUT.
#   bash benchmarks/gpu_session3.sh train  # dae-b 32x32 b256 compiled train step beside the compiled
#                                          # yardstick (img/s, MFU, compile s, peak memory); attention's
#                                          # share of the dae-b step, Triton vs SDPA
#   bash benchmarks/gpu_session3.sh measure  # the yardstick's sampling, then dae-b's throughput beside the yardstick's
#   bash benchmarks/gpu_session3.sh adaln  # AdaLN launch-configuration sweep, then the benchmark with the best
#   bash benchmarks/gpu_session3.sh tune   # the AdaLN tests on the GPU, then the LayerNorm kernels' sweep alone
#   bash benchmarks/gpu_session3.sh reload # AdaLN GPU tests; LayerNorm sweep, modulation held or reloaded
#   bash benchmarks/gpu_session3.sh ew     # AdaLN GPU tests; gated-residual sweep, then the AdaLN benchmark at its best
#   bash benchmarks/gpu_session3.sh fwdtiles # AdaLN GPU tests; forward sweep over tiles, programs/SM, stages; benchmark at its best
#   bash benchmarks/gpu_session3.sh confirm  # AdaLN GPU tests and benchmark at the defaults; dae-b beside the yardstick
#   bash benchmarks/gpu_session3.sh memory # GPU tests of the AdaLN kernels and the model; dae-b's compiled
#                                          # step beside the yardstick, then with the attention kernels'
#                                          # fixed configs; every compile on cold caches
#   bash benchmarks/gpu_session3.sh compile  # dae-b's cold first compile beside the yardstick, compiler
#                                            # phases timed; again with nested compile regions per block
#   bash benchmarks/gpu_session3.sh small  # GPU tests (the step's sync-free check among them); mldae's
#                                          # training step timed alone and under the profiler
#   bash benchmarks/gpu_session3.sh graphs # GPU training tests; dae-b's compiled step (train.compile_mode=auto:
#                                          # CUDA graphs) beside the compiled yardstick; dae-l at 64x64, batch 32
#   bash benchmarks/gpu_session3.sh long-start [ARGS]  # method_suite.py in the background (setsid: it
#          outlives this call), then waits out the call; long-finish waits for it and collects
#          its summary and eval.tar (each preset's eval/ and train.log): a run longer than one call
#          (MINUTES, default 14, e.g. --presets mldae)
#   bash benchmarks/gpu_session3.sh final  # adaln, then dae-b's compiled step again (no yardstick) and its
#                                          # top kernels under the profiler
#   bash benchmarks/gpu_session3.sh sample-once  # `diffae bench sample` once, then the yardstick's sampling
#   bash benchmarks/gpu_session3.sh methods [ARGS]  # the five method presets trained and evaluated at once
#          (MINUTES of training, default 3.5; EVAL_MINUTES, default 3; ARGS go to method_suite.py, e.g.
#          MINUTES=5.5 ... methods --presets mldae --set train.compile=true: one preset, compiled)
#   bash benchmarks/gpu_session3.sh sample # `diffae bench sample` in two processes (cold, then reusing the
#                                          # compile caches); the yardstick's sampling; GPU tests of sampling
#                                          # and AdaLN; profile_sample.py over VARIANTS (default: copy autocast)
#   bash benchmarks/gpu_session3.sh adaln-targets  # AdaLN GPU tests; the gated-residual forward
#          sweep on the target shapes (the defaults among them), then the benchmark at its best
#   bash benchmarks/gpu_session3.sh train-profile  # dae-b beside the yardstick; its top kernels (compiled, no graphs)
#   bash benchmarks/gpu_session3.sh survey  # attention GPU tests; the attention benchmark at all five
#                                           # shapes (stream and CUDA-graph timings);
#                                           # dae-b's top kernels (compiled, no graphs)
#   bash benchmarks/gpu_session3.sh mlp  # extension built: the MLP GPU tests; dae-b's step with the
#                                        # cuBLASLt GELU epilogues, then with the reference MLP
#   bash benchmarks/gpu_session3.sh mlp-bench  # extension built: MLP GPU tests; bench_mlp.py (cuBLASLt's
#          candidates' times printed); dae-b's step with the epilogue backward, then with the unfused
#          backward (DIFFAE_MLP_BWD=unfused) beside the yardstick
#   bash benchmarks/gpu_session3.sh mlp-ab  # extension built: MLP and EMA GPU tests; bench_ema.py,
#          bench_mlp.py; dae-b's step (no yardstick) with the fused MLP, then with the reference MLP
#   bash benchmarks/gpu_session3.sh mlp-yardstick  # extension built: MLP GPU tests; dae-b beside the yardstick; its top
#                                                  # kernels (compiled, no graphs)
# Expects .yardstick (train) and .data/fashion-mnist (methods) carried into the checkout.
set -uo pipefail
export PYTHONUNBUFFERED=1 DIFFAE_FASHION_MNIST=$PWD/.data/fashion-mnist
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$SECONDS
left() { echo $(( ${1} - (SECONDS - T0) )); }  # seconds left of a budget of $1 from the start
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader | tee "$OUT/gpu.txt"
case "${1:-train}" in sample|sample-once|mlp*|compile) : "${DIFFAE_NO_EXT:=0}" ;; esac  # these use the extension's ops
DIFFAE_NO_EXT=${DIFFAE_NO_EXT:-1} python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 \
  || tail -20 "$OUT/install.log"
B="--preset dae-b --img 32 --channels 3 --batch 256"
yardstick_sample() {  # the yardstick's 10-step sampling: batch 1 graphed, batch 64 eager and graphed
  { timeout 60 python3 .yardstick/plain_dit.py sample --batch 1 --graph 2>&1 | tail -1
    timeout 60 python3 .yardstick/plain_dit.py sample --batch 64 2>&1 | tail -1
    timeout 60 python3 .yardstick/plain_dit.py sample --batch 64 --graph 2>&1 | tail -1; } | tee "$OUT/yardstick-sample.txt"
}
gpu_tests() {  # the GPU-marked tests of each file; a summary line per file in gpu_tests.log
  for f in "$@"; do
    timeout 100 python3 -m pytest "$f" -m gpu -o addopts="" -p no:cacheprovider -q -s 2>&1 | grep "max\|passed\|failed\|Error" \
      | tail -12 | sed "s|^|$f: |"
  done 2>&1 | tee "$OUT/gpu_tests.log"
}
case "${1:-train}" in
  train)
    timeout 420 python3 benchmarks/bench_train.py throughput $B --results "$OUT" 2>&1 | grep -v "^W" | tee "$OUT/train-b.log"
    timeout "$(left 570)" python3 benchmarks/attention_share.py $B --no-compile --results "$OUT" 2>&1 \
      | grep -v "^W\|profiler" | tee "$OUT/attention-share.log" ;;
  measure)  # the yardstick's sampling, then the train stage's throughput comparison alone
    yardstick_sample
    timeout "$(left 570)" python3 benchmarks/bench_train.py throughput $B --results "$OUT" 2>&1 | grep -v "^W" \
      | tee "$OUT/train-b.log" ;;
  adaln)
    timeout "$(left 570)" python3 benchmarks/bench_adaln.py --sweep --apply-best --out "$OUT" > "$OUT/adaln.log" 2>&1
    grep -v "^  \[" "$OUT/adaln.log" | tail -45 ;;
  tune)  # the AdaLN tests on the GPU (the whole file), then the LayerNorm launch sweep alone
    timeout 200 python3 -m pytest tests/test_adaln.py -o addopts="" -p no:cacheprovider -q -x > "$OUT/test_adaln.log" 2>&1
    tail -8 "$OUT/test_adaln.log"
    timeout "$(left 575)" python3 benchmarks/bench_adaln.py --sweep --groups ln_fwd ln_fwd_fused ln_bwd --no-bench --out "$OUT" \
      > "$OUT/adaln-sweep.log" 2>&1
    grep -v "^  \[" "$OUT/adaln-sweep.log" | tail -40 ;;
  reload)  # the AdaLN GPU tests, then the LayerNorm sweep: per-sample modulation held or reloaded per tile
    timeout 120 python3 -m pytest tests/test_adaln.py -m gpu -o addopts="" -p no:cacheprovider -q -x \
      > "$OUT/test_adaln-gpu.log" 2>&1; tail -4 "$OUT/test_adaln-gpu.log"
    timeout "$(left 580)" python3 benchmarks/bench_adaln.py --sweep --groups ln_fwd ln_fwd_fused ln_bwd ln_bwd_fused --no-bench \
      --out "$OUT" > "$OUT/adaln-sweep.log" 2>&1
    grep -v "^  \[" "$OUT/adaln-sweep.log" | tail -40 ;;
  ew)  # AdaLN GPU tests (and the S = 1 ones); gated-residual sweep, then the benchmark at its best
    timeout 150 python3 -m pytest tests/test_adaln.py -k "gpu or one_program" \
      -o addopts="" -p no:cacheprovider -q -x > "$OUT/test_adaln-gpu.log" 2>&1; tail -4 "$OUT/test_adaln-gpu.log"
    timeout "$(left 585)" python3 benchmarks/bench_adaln.py --sweep --groups ew_fwd ew_bwd --apply-best --out "$OUT" \
      > "$OUT/adaln.log" 2>&1
    grep -v "^  \[" "$OUT/adaln.log" | tail -45 ;;
  fwdtiles)  # AdaLN GPU tests; forward sweep (small tiles, more programs, stages), benchmark at its best
    timeout 100 python3 -m pytest tests/test_adaln.py -m gpu -o addopts="" -p no:cacheprovider -q -x \
      > "$OUT/test_adaln-gpu.log" 2>&1; tail -4 "$OUT/test_adaln-gpu.log"
    timeout "$(left 585)" python3 benchmarks/bench_adaln.py --sweep --groups ln_fwd ln_fwd_fused --apply-best \
      --shapes 256x256x768 64x1024x1152 64x256x768 --out "$OUT" > "$OUT/adaln.log" 2>&1
    grep -v "^  \[" "$OUT/adaln.log" | tail -60 ;;
  confirm)  # the AdaLN GPU tests; the AdaLN benchmark at the defaults; dae-b's step beside the yardstick
    timeout 100 python3 -m pytest tests/test_adaln.py -m gpu -o addopts="" -p no:cacheprovider -q -x \
      > "$OUT/test_adaln.log" 2>&1; tail -4 "$OUT/test_adaln.log"
    timeout 270 python3 benchmarks/bench_adaln.py --shapes 256x256x768 64x1024x1152 1x256x768 64x256x768 --out "$OUT" \
      > "$OUT/adaln.log" 2>&1
    grep -v "^  \[" "$OUT/adaln.log" | tail -42
    timeout "$(left 590)" python3 benchmarks/bench_train.py throughput $B --results "$OUT" 2>&1 | grep -v "^W" \
      | tee "$OUT/train-b.log" ;;
  memory)
    gpu_tests tests/test_adaln.py tests/test_model.py tests/test_throughput.py
    cold() { export TORCHINDUCTOR_CACHE_DIR=/tmp/cold-$1/inductor TRITON_CACHE_DIR=/tmp/cold-$1/triton; }
    (cold 1; timeout 300 python3 benchmarks/bench_train.py throughput $B --results "$OUT" 2>&1 | grep -v "^W" \
      | tee "$OUT/train-b.log")
    (cold 2; DIFFAE_ATTN_AUTOTUNE=0 timeout "$(left 580)" python3 benchmarks/bench_train.py throughput $B \
      --no-yardstick 2>&1 | grep "^{" | tee "$OUT/train-fixed-attn-configs.log") ;;
  compile)  # dae-b's first compile on cold caches beside the yardstick (the compiler's phases timed),
            # then again with every AdaLN block a nested compile region (DIFFAE_NESTED_BLOCKS=1)
    cold() { local d; d=$(mktemp -d /tmp/cold-XXXX)  # new each time: a warm machine keeps old ones
             export TORCHINDUCTOR_CACHE_DIR=$d/inductor TRITON_CACHE_DIR=$d/triton; }
    (cold 1; timeout 330 python3 benchmarks/bench_train.py throughput $B --results "$OUT" 2>&1 | grep -v "^W" \
      | tee "$OUT/train-b.log")
    (cold 2; DIFFAE_NESTED_BLOCKS=1 timeout "$(left 585)" python3 benchmarks/bench_train.py throughput $B \
      --no-yardstick 2>&1 | grep -v "^W" | tail -30 | tee "$OUT/train-nested.log") ;;
  small)
    gpu_tests tests/test_training.py tests/test_adaln.py tests/test_model.py
    timeout 200 python3 benchmarks/bench_train.py throughput --preset mldae --img 28 --channels 1 --batch 256 \
      --no-yardstick 2>&1 | grep "^{" | tee "$OUT/train-mldae.log"
    timeout "$(left 580)" python3 benchmarks/profile_train.py --preset mldae --img 28 --channels 1 --batch 256 \
      --out /tmp/prof --rows 30 > "$OUT/profile-mldae.txt" 2>&1
    grep -v "^W\|profiler" "$OUT/profile-mldae.txt" | tail -36 ;;
  graphs)  # STAGE_S (default 570): this call's seconds, for a call on what is left of the device time
    S=${STAGE_S:-570}
    gpu_tests tests/test_training.py
    timeout "$(left "$S")" python3 benchmarks/bench_train.py throughput $B --results "$OUT" 2>&1 | grep -v "^W" \
      | tee "$OUT/train-b.log"
    timeout "$(left "$S")" python3 benchmarks/bench_train.py throughput --preset dae-l --img 64 --channels 3 \
      --batch 32 --no-yardstick --results "$OUT" 2>&1 | grep "^{\|Error" | tee "$OUT/train-l.log" ;;
  long-start)
    # the run reads its own copy of the data: a later call that does not carry .data finds it gone
    mkdir -p /tmp/long && cp -r .data/fashion-mnist /tmp/long/ && export DIFFAE_FASHION_MNIST=/tmp/long/fashion-mnist
    setsid nohup timeout 1700 python3 benchmarks/method_suite.py --out /tmp/suite --minutes "${MINUTES:-14}" \
      --eval-minutes "${EVAL_MINUTES:-3}" --collect /tmp/long --set train.compile=true "${@:2}" \
      > /tmp/long/run.log 2>&1 < /dev/null &
    sleep "$(left "${LONG_WAIT:-570}")"; tail -3 /tmp/long/run.log ;;
  long-finish)  # waits (within this call) for long-start's run, then hands back what it collected
    while [ ! -s /tmp/long/summary.md ] && pgrep -f method_suite.py > /dev/null && [ "$(left 560)" -gt 0 ]; do
      sleep 10; done
    tail -5 /tmp/long/run.log; cp /tmp/long/* "$OUT"/ 2>/dev/null
    # each preset's eval folder (report, plots, sample grids) and train.log as one file: few files come back
    (cd /tmp/suite && tar cf "$OUT/eval.tar" --exclude="*.pt" */eval */train.log) 2>/dev/null ;;
  final)
    timeout 240 python3 benchmarks/bench_adaln.py --sweep --apply-best --out "$OUT" > "$OUT/adaln.log" 2>&1
    grep -v "^  \[" "$OUT/adaln.log" | tail -30
    timeout 150 python3 benchmarks/bench_train.py throughput $B --no-yardstick --results "$OUT" 2>&1 | grep "^{" \
      | tee "$OUT/train-b.log"
    timeout "$(left 570)" python3 benchmarks/profile_train.py $B --out /tmp/prof --rows 30 > "$OUT/profile.txt" 2>&1
    grep -v "^W\|profiler" "$OUT/profile.txt" | tail -36 ;;
  sample)
    # `diffae bench sample` first, in two processes: the first on cold compile caches (its first call
    # is the cold compile + capture), the second reusing them
    for i in 1 2; do
      timeout 150 python3 -m diffae bench sample --preset dae-b --batch 1 64 --steps 10 --compile --cuda-graph \
        --json "$OUT/bench-sample-$i.json" 2>&1 | grep "^{"
    done | tee "$OUT/bench-sample.log"
    yardstick_sample
    gpu_tests tests/test_graphs.py tests/test_model.py tests/test_sampler_step.py tests/test_adaln.py
    timeout "$(left 585)" python3 benchmarks/profile_sample.py --batch 1 64 --variants ${VARIANTS:-copy autocast} \
      --results "$OUT" 2>&1 | grep -v "^W" | tee "$OUT/profile-sample.log" ;;
  sample-once)  # `diffae bench sample` once (extension built), then the yardstick's sampling
    timeout 300 python3 -m diffae bench sample --preset dae-b --batch 1 64 --steps 10 --compile --cuda-graph \
      --json "$OUT/bench-sample.json" 2>&1 | grep -v "^W" | tee "$OUT/bench-sample.log"
    yardstick_sample ;;
  adaln-targets)
    timeout 100 python3 -m pytest tests/test_adaln.py -m gpu -o addopts="" -p no:cacheprovider -q -x \
      > "$OUT/test_adaln.log" 2>&1; tail -4 "$OUT/test_adaln.log"
    timeout "$(left 585)" python3 benchmarks/bench_adaln.py --sweep --groups ew_fwd --apply-best \
      --out "$OUT" > "$OUT/adaln.log" 2>&1
    grep -A12 "^fastest" "$OUT/adaln.log"; grep -v "^  \[" "$OUT/adaln.log" | grep -A30 "^benchmarking" | tail -31 ;;
  train-profile)  # dae-b's step beside the compiled yardstick; then its top kernels, compiled without graphs
    timeout 330 python3 benchmarks/bench_train.py throughput $B --results "$OUT" 2>&1 | grep -v "^W" | tee "$OUT/train-b.log"
    timeout "$(left 585)" python3 benchmarks/profile_train.py $B --compile-mode default --out /tmp/prof --rows 45 \
      > "$OUT/profile.txt" 2>&1
    grep -v "^W\|profiler" "$OUT/profile.txt" | tail -52 ;;
  survey)
    timeout 150 python3 -m pytest tests/test_attention.py -m gpu -o addopts="" -p no:cacheprovider -q \
      > "$OUT/test_attention-gpu.log" 2>&1; tail -5 "$OUT/test_attention-gpu.log"
    timeout 270 python3 benchmarks/bench_attention.py --out "$OUT" > "$OUT/attention.log" 2>&1
    tail -32 "$OUT/attention.log"
    timeout "$(left 585)" python3 benchmarks/profile_train.py $B --compile-mode default --out /tmp/prof --rows 60 \
      > "$OUT/profile.txt" 2>&1
    grep -v "^W\|profiler\|_warn_once" "$OUT/profile.txt" | tail -66 | cut -c1-60,150-260 ;;
  mlp)
    gpu_tests tests/test_mlp.py
    timeout "$(left 400)" python3 benchmarks/bench_train.py throughput $B --no-yardstick --results "$OUT" 2>&1 \
      | grep -v "^W" | tee "$OUT/train-b.log"
    DIFFAE_BACKEND=gelu_mlp=reference timeout "$(left 585)" python3 benchmarks/bench_train.py throughput $B \
      --no-yardstick 2>&1 | grep -v "^W" | tee "$OUT/train-b-reference-mlp.log" ;;
  mlp-bench)
    gpu_tests tests/test_mlp.py
    DIFFAE_LT_AUTOTUNE=verbose timeout 150 python3 benchmarks/bench_mlp.py --out "$OUT" > "$OUT/mlp.log" 2>&1; tail -12 "$OUT/mlp.log"
    timeout "$(left 330)" python3 benchmarks/bench_train.py throughput $B --no-yardstick --results "$OUT" 2>&1 \
      | grep "^{" | tee "$OUT/train-b.log"
    DIFFAE_MLP_BWD=unfused timeout "$(left 590)" python3 benchmarks/bench_train.py throughput $B 2>&1 \
      | grep -v "^W" | tee "$OUT/train-b-unfused-bwd.log"
    (cd "$OUT" && tar cf logs.tar ./*.log gpu.txt && rm ./*.log gpu.txt) ;;  # few files come back
  mlp-yardstick)
    gpu_tests tests/test_mlp.py
    timeout 360 python3 benchmarks/bench_train.py throughput $B --results "$OUT" 2>&1 | grep -v "^W" | tee "$OUT/train-b.log"
    timeout "$(left 585)" python3 benchmarks/profile_train.py $B --compile-mode default --out /tmp/prof --rows 45 \
      > "$OUT/profile.txt" 2>&1
    grep -v "^W\|profiler\|_warn_once" "$OUT/profile.txt" | tail -50 | cut -c1-60,150-260 ;;
  mlp-ab)  # MLP and EMA GPU tests; bench_ema, bench_mlp; dae-b's step with and without the fused MLP
    gpu_tests tests/test_mlp.py tests/test_multi_tensor.py
    timeout 60 python3 benchmarks/bench_ema.py --out "$OUT" 2>&1 | grep -v "^W" | tee "$OUT/ema.log"
    timeout 150 python3 benchmarks/bench_mlp.py --out "$OUT" > "$OUT/mlp.log" 2>&1; tail -4 "$OUT/mlp.log"
    for v in fused DIFFAE_BACKEND=gelu_mlp=reference; do
      env $([ $v = fused ] || echo $v) timeout "$(left 590)" python3 benchmarks/bench_train.py throughput $B \
        --no-yardstick 2>&1 | grep "^{" | sed "s|^|$v |" | tee -a "$OUT/train-b-variants.log"
    done ;;
  methods)
    timeout 590 python3 benchmarks/method_suite.py --out /tmp/suite --minutes "${MINUTES:-3.5}" \
      --eval-minutes "${EVAL_MINUTES:-3}" --collect "$OUT" "${@:2}" 2>&1 | tail -45 ;;
esac
echo "session stage done in $((SECONDS - T0)) s"
