#!/usr/bin/env bash
# Issue 11's measurements on one H200, one stage a device call (each well inside a call's 600 s):
#
#   STAGE=tests bash benchmarks/issue11_gpu.sh   # compiled GPU tests: attention, routing, run tail (~400 s)
#   STAGE=route bash benchmarks/issue11_gpu.sh   # one layer at 100M: 20 calls a sample, profiled (42 s unprofiled on an H100)
#   STAGE=route_stages bash benchmarks/issue11_gpu.sh  # the same with 3 pipeline stages and
#                                                # 128-chunk tiles 2 and 4 deep (bf16's
#                                                # tiling before 2026-12-06), then the run
#                                                # tail's kernels alone at 100M (~250 s)
#   STAGE=ttft  bash benchmarks/issue11_gpu.sh   # TTFT + decode at 100M, int8, batch 1 and 8 (~200 s)
#   STAGE=host_kv bash benchmarks/issue11_gpu.sh # bf16 K̄/V̄ in host memory against on the
#                                                # device at 10M (14.7 GB; at 100M 147 GB,
#                                                # more than the machine's 128 GiB)
#   STAGE=host_kv_100m bash benchmarks/issue11_gpu.sh  # int8 K̄/V̄ (74 GB) in host memory at 100M
#
# Logs and JSON go to $OUT/issue11_<stage>/ (OUT defaults to /tmp/out).
# DRY=1 prints the commands instead of running them (benchmarks/gpu_stage.sh).
set -u
STAGES="tests, route, route_stages, ttft, host_kv or host_kv_100m"
STAGE=${STAGE:?set STAGE=$STAGES}
ISSUE=issue11
source "$(dirname "$0")/gpu_stage.sh"

ROUTE=(-m benchmarks.ttft --shape=qwen3-4b --tokens=100000000 --route_sizes=100000000
       --stages=route --kr_dtypes=bfloat16,int8,float8_e4m3fn --route_profile
       --route_impls=pallas,pallas:stages=4)
# (pallas:persistent=true, the chunk-score kernel as one program an SM streaming its tiles,
# was slower for every precision on an H100, 2026-12-05T10:45Z: no longer timed here.
# pallas:stages=4:
# fp8 one term at 1.10 x its read against 1.11 with 2 stages, batch 8 8 % slower,
# BENCHMARKS.md 2026-12-05T05:27Z)

case "$STAGE" in
  tests)
    step attention 200 env MSA_TEST_GPU=1 $PY -m pytest -q -m gpu tests/test_kernel_sparse_attention.py
    step routing 350 env MSA_TEST_GPU=1 $PY -m pytest -q -m gpu tests/test_kernel_routing_quant.py \
      tests/test_run_top_k.py tests/test_kernel_routing.py ;;
  route)
    step route_it20 300 $PY "${ROUTE[@]}" --timing_iters=20 --out="$DIR/it20" ;;
  route_stages)
    step route_stages 330 $PY -m benchmarks.ttft --shape=qwen3-4b --tokens=100000000 \
      --route_sizes=100000000 --stages=route --kr_dtypes=bfloat16,int8,float8_e4m3fn \
      --route_profile --route_impls=pallas,pallas:stages=3,pallas:chunks=128:stages=2,pallas:chunks=128:stages=4 \
      --timing_iters=20 --out="$DIR/stages"
    step tail_profile 150 $PY -m benchmarks.routing_tail --tokens 1e8 --doc_chunks 2 \
      --batches 1,8 --profile ;;
  ttft)
    step ttft 420 $PY -m benchmarks.ttft --shape=qwen3-4b --tokens=100000000 \
      --ttft_sizes=100000000 --stages=ttft --ttft_batches=1,8 --no_e2e --routing=pallas \
      --kr_dtype=int8 --out="$DIR" ;;
  host_kv)
    for placement in host device; do
      step "${placement}_10m_bf16" 240 $PY -m benchmarks.ttft --shape=qwen3-4b \
        --tokens=10000000 --ttft_sizes=10000000 --stages=ttft --ttft_batches=1,8 --no_e2e \
        --routing=pallas --kr_dtype=int8 --kv_dtype=bfloat16 --kv_placement=$placement \
        --out="$DIR/${placement}_10m_bf16"
    done ;;
  host_kv_100m)
    step host_100m_int8 500 $PY -m benchmarks.ttft --shape=qwen3-4b --tokens=100000000 \
      --ttft_sizes=100000000 --stages=ttft --ttft_batches=1,8 --no_e2e --routing=pallas \
      --kr_dtype=int8 --kv_dtype=int8 --kv_placement=host --out="$DIR/host_100m_int8" ;;
  *)
    echo "STAGE=$STAGE: choose $STAGES" >&2
    exit 2 ;;
esac
