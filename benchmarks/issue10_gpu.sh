#!/usr/bin/env bash
# Issue 10's next measurements on one H200 (0.6b at 16K memory tokens, batch 32), one stage a
# device call (each well inside a call's 600 s):
#
#   STAGE=profile bash benchmarks/issue10_gpu.sh  # the recipe's step (cuBLAS, the recipes'
#                                                  # xla_flags), profiled: the
#                                                  # by-source-op table of where the time goes
#   STAGE=gemm_profile bash benchmarks/issue10_gpu.sh  # the same with XLA's command
#                                                  # buffers off: its kernels keep their HLO
#                                                  # names, so the profile also gives each
#                                                  # GEMM's shape and TFLOP/s
#   STAGE=lean_norm bash benchmarks/issue10_gpu.sh  # the embedding gradient's methods alone
#                                                  # (benchmarks.embed_grad), then the step
#                                                  # with model.rms_norm_vjp="lean" (RMSNorm's
#                                                  # hand-written backward) and
#                                                  # model.embed_grad="f32_scatter", profiled
#   STAGE=pad_free bash benchmarks/issue10_gpu.sh  # the pad-free attention's compiled tests,
#                                                  # then the step with it, profiled
#   STAGE=recipes bash benchmarks/issue10_gpu.sh  # the pad-free compiled tests, then the
#                                                  # 0.6b step as the recipe now stands
#                                                  # (pad-free attention, float32 embedding
#                                                  # gradient), no overrides
#   STAGE=recipe_06b bash benchmarks/issue10_gpu.sh  # the 0.6b step alone, as the recipe
#                                                  # now stands (issue 10's headline, ~240 s)
#   STAGE=slice_fusion bash benchmarks/issue10_gpu.sh  # the 0.6b recipe's step without and
#                                                  # with XLA's dynamic-slice fusion (cuBLAS
#                                                  # reading each scanned layer's weights in
#                                                  # place instead of ~800 slice copies a
#                                                  # step), each in its own process (~400 s)
#   STAGE=cmd_buffer_while bash benchmarks/issue10_gpu.sh  # the 0.6b recipe's step with
#                                                  # the scanned layers' while loops in CUDA
#                                                  # graphs too (command buffer types WHILE,
#                                                  # CONDITIONAL beside the usual) against
#                                                  # XLA's default set, ~400 s
#   STAGE=recipe_4b bash benchmarks/issue10_gpu.sh  # the same for 4b at batch 8
#   STAGE=recipe_64k bash benchmarks/issue10_gpu.sh  # 0.6b at 64K memory tokens, batch 8,
#                                                  # as the recipe now stands
#   STAGE=recipe_4b_64k bash benchmarks/issue10_gpu.sh  # 4b at 64K memory tokens, batch 2,
#                                                  # then 16K at batch 10 (the largest
#                                                  # batch that fits: an OOM ends the search)
#   STAGE=fused_norm bash benchmarks/issue10_gpu.sh  # the q/k norm + RoPE alone at one
#                                                  # layer's q shape (benchmarks.norm_rope:
#                                                  # autodiff, lean, fused against floors),
#                                                  # then the step with
#                                                  # model.qk_norm_rope_vjp="fused", profiled
#   STAGE=compare bash benchmarks/issue10_gpu.sh  # the recipe's step against
#                                                  # qk_norm_rope_vjp=fused, rope_tables and
#                                                  # both, in one process on one batch
#                                                  # (--compare; step_vs_first in the rows)
#   STAGE=compare_remat bash benchmarks/issue10_gpu.sh  # the same for
#                                                  # remat_policy=mlp_input and the tiled
#                                                  # documents' forward
#   STAGE=dots_mb bash benchmarks/issue10_gpu.sh  # remat_policy=dots in 4 microbatches
#                                                  # (no second forward of the matmuls;
#                                                  # 108 GiB: an H200 only) against the
#                                                  # recipe, each its own process: session
#                                                  # 19 found it slower (4,802 against 4,628
#                                                  # ms) when pads, a bf16 scatter-add and
#                                                  # the q/k norms' float32 copies, since
#                                                  # removed, ran in every slice
#   STAGE=cublaslt bash benchmarks/issue10_gpu.sh  # the recipe's step with
#                                                  # --xla_gpu_enable_cublaslt=true against
#                                                  # cuBLAS (the matmuls run at ~690 of ~900
#                                                  # TFLOP/s)
#   STAGE=rope_tables bash benchmarks/issue10_gpu.sh  # benchmarks.norm_rope (its "tables"
#                                                  # row: cos/sin given), then the step
#                                                  # with model.rope_tables=True, profiled
#   STAGE=mlp_input bash benchmarks/issue10_gpu.sh  # the step with
#                                                  # model.remat_policy="mlp_input" (each
#                                                  # layer's residual after attention kept:
#                                                  # o_proj not recomputed; ~31 GB more)
#   STAGE=short_step bash benchmarks/issue10_gpu.sh  # the step with
#                                                  # model.attention_short_persistent=False
#                                                  # (the documents' attention forward tiled,
#                                                  # as before the recipes turned the
#                                                  # persistent kernel on), profiled
#   STAGE=levers bash benchmarks/issue10_gpu.sh  # the step with fused_norm's and
#                                                  # mlp_input's switches at once (and the
#                                                  # recipe's persistent documents'
#                                                  # forward), profiled: the profile's
#                                                  # by-source table says what each did
#   STAGE=doc_attention bash benchmarks/issue10_gpu.sh  # the documents' attention alone
#                                                  # at the 0.6b and 4b steps' shapes:
#                                                  # Pallas tilings, XLA, cuDNN causal,
#                                                  # against byte floors
#   STAGE=short_bwd bash benchmarks/issue10_gpu.sh  # the documents' persistent backward
#                                                  # (model.attention_short_persistent_bwd):
#                                                  # its compiled tests, the documents'
#                                                  # attention alone with the tiled and the
#                                                  # persistent backward, each kernel's
#                                                  # device time (the delta pass, dQ, dK/dV
#                                                  # apart: which is far from its bytes),
#                                                  # then the step with and without the
#                                                  # persistent one
#   STAGE=compile_parallel bash benchmarks/issue10_gpu.sh  # the init program's draws grouped
#                                                  # and per parameter
#                                                  # (benchmarks/init_time.py), then with
#                                                  # XLA's LLVM codegen split over the
#                                                  # host's cores, then the step's compile
#                                                  # (--steps 0) with that split
#   STAGE=mlp_gemm bash benchmarks/issue10_gpu.sh  # one layer's MLP GEMMs alone
#                                                  # (benchmarks.mlp_gemm): cuBLAS, gate
#                                                  # and up merged, JAX's example Pallas
#                                                  # Hopper GEMM, against the FLOP floor
#                                                  # (~60 s): does a Pallas GEMM with a
#                                                  # SwiGLU epilogue have room to pay?
#   STAGE=no_remat bash benchmarks/issue10_gpu.sh  # the recipe (full remat) against no remat
#                                                  # in slices of one example (remat's second
#                                                  # forward gone; two do not fit an H100)
#                                                  # and full remat in 4 slices (what a slice
#                                                  # costs), one process, one batch (~5 min)
#   STAGE=norm_kernels bash benchmarks/issue10_gpu.sh  # the q/k norm + RoPE kernels
#                                                  # (pallas_kernels/norm_rope.py): their
#                                                  # compiled tests, one layer's q path each
#                                                  # way (benchmarks.norm_rope: the kernels
#                                                  # second, then alone in three tilings),
#                                                  # then the recipe's step (pallas since
#                                                  # session 38) against fused_bf16 in one
#                                                  # process (~450 s)
#   STAGE=compile_norm bash benchmarks/issue10_gpu.sh  # what the q/k norm kernels add to
#                                                  # the 0.6b step's compile: the kernels'
#                                                  # own compile, then the step compiled
#                                                  # cold with pallas and with fused_bf16,
#                                                  # each in its own process (~350 s)
#   STAGE=norm_4b bash benchmarks/issue10_gpu.sh  # the 4b step (batch 8: an H200) against
#                                                  # qk_norm_rope_vjp=fused_bf16 and pallas
#                                                  # (the 0.6b recipe's), in one process
#                                                  # (~560 s)
#   STAGE=triton  bash benchmarks/issue10_gpu.sh  # the same step with XLA's Triton GEMMs (they
#                                                  # can fuse elementwise producers), cold then
#                                                  # warm autotune cache: compile time and MFU
#
# Logs and JSON go to $OUT/issue10_<stage>/ (OUT defaults to /tmp/out). DRY=1 prints the
# commands instead of running them. BATCH=16 runs the 0.6b steps at batch 16 (an H100).
# OVERLAP=1 initialises each step's state while it compiles (--overlap_init: saves the
# 60-145 s the init program takes to compile on a fresh machine; the compile times it
# reports then share the host's cores, so leave it off where compile time is the question).
set -u
STAGES="compile_parallel, profile, gemm_profile, dots_mb, lean_norm, pad_free, recipes, recipe_06b, slice_fusion, cmd_buffer_while, recipe_4b, recipe_64k, recipe_4b_64k, fused_norm, rope_tables, compare, compare_remat, cublaslt, mlp_input, short_step, levers, doc_attention, short_bwd, mlp_gemm, no_remat, norm_kernels, compile_norm, norm_4b or triton"
STAGE=${STAGE:?set STAGE=$STAGES}
ISSUE=issue10
source "$(dirname "$0")/gpu_stage.sh"

BATCH=${BATCH:-32}   # the 0.6b batch; 16 on an H100 (batch 32 needs 75.8 GiB)
STEP=(-m benchmarks.train_step --variants 0.6b --memory 16384 --batches "$BATCH" --steps 3
      ${OVERLAP:+--overlap_init})
TRITON="--xla_gpu_enable_triton_gemm=true --xla_gpu_per_fusion_autotune_cache_dir=/tmp/atc"

case "$STAGE" in
  profile)
    step profile 420 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY "${STEP[@]}" --compilation_cache_dir /tmp/jcc --profile_dir /tmp/prof \
      --out "$DIR/train_step_0.6b_b${BATCH}_profiled.json" ;;
  gemm_profile)
    step gemm_profile 420 env XLA_FLAGS="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_command_buffer=" \
      $PY "${STEP[@]}" --compilation_cache_dir /tmp/jcc --profile_dir /tmp/prof_gemm \
      --out "$DIR/train_step_0.6b_b${BATCH}_gemm_profiled.json" ;;
  lean_norm)
    step embed_grad 90 $PY -m benchmarks.embed_grad --out "$DIR/embed_grad.json"
    step lean_norm 400 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY "${STEP[@]}" --rms_norm_vjp lean --embed_grad f32_scatter \
      --compilation_cache_dir /tmp/jcc \
      --profile_dir /tmp/prof_lean --out "$DIR/train_step_0.6b_b${BATCH}_lean_norm.json" ;;
  pad_free)   # the compiled tests first: the step only if the kernels are right
    step pad_free_tests 200 env MSA_TEST_GPU=1 $PY -m pytest -q -m gpu \
      tests/test_kernel_sparse_attention.py -k pad_free
    if [ -z "${DRY:-}" ] && grep -q "failed\|error" "$DIR/pad_free_tests.log"; then exit 1; fi
    step pad_free 330 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY "${STEP[@]}" --attention_pad_free --compilation_cache_dir /tmp/jcc \
      --profile_dir /tmp/prof_pad_free --out "$DIR/train_step_0.6b_b${BATCH}_pad_free.json" ;;
  recipes)
    step pad_free_tests 150 env MSA_TEST_GPU=1 $PY -m pytest -q -m gpu \
      tests/test_kernel_sparse_attention.py -k pad_free
    step recipe_0.6b 240 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY "${STEP[@]}" --compilation_cache_dir /tmp/jcc \
      --out "$DIR/train_step_0.6b_b${BATCH}_recipe.json" ;;
  recipe_06b)
    step recipe_0.6b 240 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY "${STEP[@]}" --compilation_cache_dir /tmp/jcc \
      --out "$DIR/train_step_0.6b_b${BATCH}_recipe.json" ;;
  slice_fusion)
    for fusion in false true; do
      step "recipe_0.6b_slice_fusion_$fusion" 200 env XLA_FLAGS="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=$fusion" \
        $PY "${STEP[@]}" --compilation_cache_dir /tmp/jcc \
        --out "$DIR/train_step_0.6b_b${BATCH}_slice_fusion_$fusion.json"
    done ;;
  cmd_buffer_while)
    for set in ${SETS:-default while}; do   # SETS=while: the second alone
      flag=
      [ "$set" = while ] && \
        flag=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
      step "recipe_0.6b_cmd_buffer_$set" 200 env XLA_FLAGS="--xla_gpu_enable_triton_gemm=false $flag" \
        $PY "${STEP[@]}" --compilation_cache_dir /tmp/jcc \
        --out "$DIR/train_step_0.6b_b${BATCH}_cmd_buffer_$set.json"
    done ;;
  recipe_4b)
    step recipe_4b 330 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY -m benchmarks.train_step --variants 4b --memory 16384 --batches 8 --steps 3 \
      --compilation_cache_dir /tmp/jcc --out "$DIR/train_step_4b_b8_recipe.json" ;;
  recipe_64k)
    step recipe_0.6b_64k 300 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY -m benchmarks.train_step --variants 0.6b --memory 65536 --batches 8 --steps 3 \
      --compilation_cache_dir /tmp/jcc --out "$DIR/train_step_0.6b_64k_b8_recipe.json" ;;
  recipe_4b_64k)
    step recipe_4b_64k 300 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY -m benchmarks.train_step --variants 4b --memory 65536 --batches 2 --steps 3 \
      --compilation_cache_dir /tmp/jcc --out "$DIR/train_step_4b_64k_b2_recipe.json"
    step recipe_4b_b10 240 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY -m benchmarks.train_step --variants 4b --memory 16384 --batches 10 --steps 3 \
      --compilation_cache_dir /tmp/jcc --out "$DIR/train_step_4b_b10_recipe.json" ;;
  fused_norm)
    step norm_rope 200 $PY -m benchmarks.norm_rope --out "$DIR/norm_rope.json"
    step fused_norm 330 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY "${STEP[@]}" --qk_norm_rope_vjp fused --compilation_cache_dir /tmp/jcc \
      --profile_dir /tmp/prof_fused_norm --out "$DIR/train_step_0.6b_b${BATCH}_fused_norm.json" ;;
  short_step)
    step short_step 330 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY "${STEP[@]}" --no-attention_short_persistent --compilation_cache_dir /tmp/jcc \
      --profile_dir /tmp/prof_short --out "$DIR/train_step_0.6b_b${BATCH}_tiled_doc_fwd.json" ;;
  levers)
    step levers 400 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY "${STEP[@]}" --qk_norm_rope_vjp fused --remat_policy mlp_input \
      --compilation_cache_dir /tmp/jcc \
      --profile_dir /tmp/prof_levers --out "$DIR/train_step_0.6b_b${BATCH}_levers.json" ;;
  compare)   # the levers against the recipe in one process, on one batch (2 steps each)
    step compare 560 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY -m benchmarks.train_step --variants 0.6b --memory 16384 --batches "$BATCH" --steps 2 \
      --compare "base;qk_norm_rope_vjp=fused;rope_tables=true;rope_tables=true,qk_norm_rope_vjp=fused" \
      --compilation_cache_dir /tmp/jcc --out "$DIR/train_step_0.6b_b${BATCH}_compare.json" ;;
  compare_remat)   # mlp_input remat (+~30 GiB) and the tiled documents' forward, against the recipe
    step compare_remat 560 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY -m benchmarks.train_step --variants 0.6b --memory 16384 --batches "$BATCH" --steps 2 \
      --compare "base;remat_policy=mlp_input;attention_short_persistent=false" \
      --compilation_cache_dir /tmp/jcc --out "$DIR/train_step_0.6b_b${BATCH}_compare_remat.json" ;;
  dots_mb)
    step recipe 250 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY "${STEP[@]}" --compilation_cache_dir /tmp/jcc \
      --out "$DIR/train_step_0.6b_b${BATCH}_recipe.json"
    step dots_mb4 300 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY "${STEP[@]}" --remat_policy dots --microbatches 4 --compilation_cache_dir /tmp/jcc \
      --out "$DIR/train_step_0.6b_b${BATCH}_dots_mb4.json" ;;
  cublaslt)   # the recipe's step with XLA's GEMMs through cuBLASLt (its own heuristics and
              # kernels), against the same step through cuBLAS in this call
    step cublas 300 env XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" $PY "${STEP[@]}" \
      --compilation_cache_dir /tmp/jcc --out "$DIR/train_step_0.6b_b${BATCH}_cublas.json"
    step cublaslt 300 env XLA_FLAGS="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true" \
      $PY "${STEP[@]}" --compilation_cache_dir /tmp/jcc \
      --out "$DIR/train_step_0.6b_b${BATCH}_cublaslt.json" ;;
  rope_tables)   # one layer's q path with the tables given, then the step with them
    step norm_rope 200 $PY -m benchmarks.norm_rope --out "$DIR/norm_rope.json"
    step rope_tables 330 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY "${STEP[@]}" --rope_tables --compilation_cache_dir /tmp/jcc \
      --profile_dir /tmp/prof_rope_tables --out "$DIR/train_step_0.6b_b${BATCH}_rope_tables.json" ;;
  mlp_input)
    step mlp_input 330 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY "${STEP[@]}" --remat_policy mlp_input --compilation_cache_dir /tmp/jcc \
      --out "$DIR/train_step_0.6b_b${BATCH}_mlp_input.json" ;;
  doc_attention)   # the short kernel's compiled tests first (its timing rows need them)
    step short_tests 120 env MSA_TEST_GPU=1 $PY -m pytest -q -m gpu \
      tests/test_kernel_sparse_attention.py -k short
    step doc_attention_0.6b 240 $PY -m benchmarks.doc_attention --shape 0.6b --kernel_times \
      --out "$DIR/doc_attention_0.6b.json"
    step doc_attention_4b 150 $PY -m benchmarks.doc_attention --shape 4b \
      --out "$DIR/doc_attention_4b.json" ;;
  short_bwd)   # compiled tests first (the timing rows need them), then alone, then the step
    step short_tests 130 env MSA_TEST_GPU=1 $PY -m pytest -q -m gpu \
      tests/test_kernel_sparse_attention.py -k short
    step doc_attention_short_bwd 110 $PY -m benchmarks.doc_attention --shape 0.6b \
      --fwd short_persistent --bwd b64x64s2,short_fwd,short_fwd_bwd --kernel_times \
      --out "$DIR/doc_attention_0.6b_short_bwd.json"
    if [ -z "${DRY:-}" ] && grep -q "failed\|error" "$DIR/short_tests.log"; then exit 1; fi
    step compare_short_bwd 300 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY -m benchmarks.train_step --variants 0.6b --memory 16384 --batches "$BATCH" --steps 2 \
      --compare "base;attention_short_persistent_bwd=true" \
      --compilation_cache_dir /tmp/jcc --out "$DIR/train_step_0.6b_b${BATCH}_compare_short_bwd.json" ;;
  compile_parallel)
    # (--xla_gpu_enable_llvm_module_compilation_parallelism is not a flag of jaxlib 0.11.2's
    # XLA: "Unknown flag", H100, 2026-12-05T22:41Z; SKIP_DEFAULT=1 skips the first step)
    PAR="--xla_gpu_force_compilation_parallelism=$(nproc)"
    [ -n "${SKIP_DEFAULT:-}" ] || step init_default 150 $PY -m benchmarks.init_time \
      --variants 0.6b --out "$DIR/init_time_0.6b_default.json"
    step init_parallel 120 env XLA_FLAGS="$PAR" $PY -m benchmarks.init_time --variants 0.6b \
      --out "$DIR/init_time_0.6b_parallel.json"
    step step_parallel 110 env XLA_FLAGS="--xla_gpu_enable_triton_gemm=false $PAR" \
      $PY "${STEP[@]}" --steps 0 --out "$DIR/train_step_0.6b_b${BATCH}_compile_parallel.json"
    step step_default 110 env XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
      $PY "${STEP[@]}" --steps 0 --out "$DIR/train_step_0.6b_b${BATCH}_compile_default.json" ;;
  mlp_gemm)
    step mlp_gemm 100 $PY -m benchmarks.mlp_gemm --tokens 65536
    step mlp_gemm_b16 100 $PY -m benchmarks.mlp_gemm --tokens 271232 --tilings 128x128x4,128x256x4 ;;
  no_remat)
    step no_remat 560 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY -m benchmarks.train_step --variants 0.6b --memory 16384 --batches "$BATCH" --steps 2 \
      --compare "base;remat_policy=none,microbatches=$BATCH;microbatches=4" \
      --overlap_init --compilation_cache_dir /tmp/jcc \
      --out "$DIR/train_step_0.6b_b${BATCH}_no_remat.json" ;;
  norm_kernels)
    step norm_tests 90 env MSA_TEST_GPU=1 $PY -m pytest -q -m gpu tests/test_kernel_norm_rope.py
    step norm_rope 150 $PY -m benchmarks.norm_rope --out "$DIR/norm_rope.json"
    step compare 300 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY -m benchmarks.train_step --variants 0.6b --memory 16384 --batches "$BATCH" --steps 2 \
      --compare "base;qk_norm_rope_vjp=fused_bf16" --overlap_init --compilation_cache_dir /tmp/jcc \
      --out "$DIR/train_step_0.6b_b${BATCH}_norm_kernels.json" ;;
  compile_norm)
    step kernels_compile 120 $PY -m benchmarks.norm_rope --kernels_only --kernel_configs 1:2:1 \
      --out "$DIR/norm_kernels_compile.json"
    for vjp in pallas fused_bf16; do
      step "compile_$vjp" 150 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
        $PY -m benchmarks.train_step --variants 0.6b --memory 16384 --batches "$BATCH" --steps 0 \
        --qk_norm_rope_vjp "$vjp" --out "$DIR/train_step_0.6b_b${BATCH}_compile_$vjp.json"
    done ;;
  norm_4b)
    step compare_4b 560 env XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
      $PY -m benchmarks.train_step --variants 4b --memory 16384 --batches 8 --steps 2 \
      --compare "base;qk_norm_rope_vjp=fused_bf16;qk_norm_rope_vjp=pallas" --overlap_init \
      --compilation_cache_dir /tmp/jcc --out "$DIR/train_step_4b_b8_norm.json" ;;
  triton)
    step triton_cold 330 env XLA_FLAGS="$TRITON" $PY "${STEP[@]}" \
      --out "$DIR/train_step_0.6b_b${BATCH}_triton_cold.json"
    step triton_warm 240 env XLA_FLAGS="$TRITON" $PY "${STEP[@]}" \
      --out "$DIR/train_step_0.6b_b${BATCH}_triton_warm.json" ;;
  *)
    echo "STAGE=$STAGE: choose $STAGES" >&2
    exit 2 ;;
esac
