#!/usr/bin/env bash
# Issue 11's measurements on one H200, one stage a device call (each well inside a call's 600 s):
#
#   STAGE=tests bash benchmarks/issue11_gpu.sh   # compiled GPU tests: attention, routing, run tail (~400 s)
#   STAGE=route bash benchmarks/issue11_gpu.sh   # one layer at 100M: 5 and 20 calls a sample, profiled (~300 s)
#   STAGE=ttft  bash benchmarks/issue11_gpu.sh   # TTFT + decode at 100M, int8, batch 1 and 8 (~200 s)
#
# Logs and JSON go to $OUT/issue11_<stage>/ (OUT defaults to /tmp/out).
# DRY=1 prints the commands instead of running them (benchmarks/gpu_stage.sh).
set -u
STAGE=${STAGE:?set STAGE=tests, route or ttft}
ISSUE=issue11
source "$(dirname "$0")/gpu_stage.sh"

ROUTE=(-m benchmarks.ttft --shape=qwen3-4b --tokens=100000000 --route_sizes=100000000
       --stages=route --kr_dtypes=bfloat16,int8,float8_e4m3fn --route_profile
       --route_impls=pallas,pallas-unfused-fp8q2,pallas:stages=4,pallas:features=64:stages=8)
# (pallas:stages=4: four pipeline stages for the 8-bit keys too, untried in the route; the
# chunk-score step alone ran fp8 one term at 372 µs with 4 stages, BENCHMARKS.md.
# pallas:features=64:stages=8: half-width steps, twice as many in flight: the bf16 kernel
# ran 912 µs against a read's 890 with 128-feature steps, 4 deep)

case "$STAGE" in
  tests)
    step attention 150 env MSA_TEST_GPU=1 $PY -m pytest -q -m gpu tests/test_kernel_sparse_attention.py
    step routing 380 env MSA_TEST_GPU=1 $PY -m pytest -q -m gpu tests/test_kernel_routing_quant.py \
      tests/test_run_top_k.py tests/test_kernel_routing.py ;;
  route)
    step route_it5 240 $PY "${ROUTE[@]}" --timing_iters=5 --out="$DIR/it5"
    step route_it20 300 $PY "${ROUTE[@]}" --timing_iters=20 --out="$DIR/it20"
    # the tail's 14 small kernels with XLA's command buffers (CUDA graphs) off: does the
    # graph launch cost or save time between them?
    step route_nocmdbuf 150 env XLA_FLAGS="--xla_gpu_enable_command_buffer=" $PY -m benchmarks.ttft \
      --shape=qwen3-4b --tokens=100000000 --route_sizes=100000000 --stages=route \
      --kr_dtypes=bfloat16 --route_profile --route_impls=pallas --timing_iters=20 \
      --out="$DIR/nocmdbuf" ;;
  ttft)
    step ttft 420 $PY -m benchmarks.ttft --shape=qwen3-4b --tokens=100000000 \
      --ttft_sizes=100000000 --stages=ttft --ttft_batches=1,8 --no_e2e --routing=pallas \
      --kr_dtype=int8 --out="$DIR" ;;
  *)
    echo "STAGE=$STAGE: choose tests, route or ttft" >&2
    exit 2 ;;
esac
