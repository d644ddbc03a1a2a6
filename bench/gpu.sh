#!/usr/bin/env bash
# The prepared GPU run (8-10 minutes on an H200 with torch 2.11 / triton 3.6): the GPU tests,
# then the bench suites. Writes logs, JSON and plots under OUT (default bench/results/<date>).
#   bash bench/gpu.sh [OUT]
#   bash bench/gpu.sh --stage DIR   only lay out the staged copy it runs from (checked without a GPU)
# Nothing is installed: llama_fast is staged as the package layout setup.py would install
# (kernels/ as llama_fast/kernels) beside copies of tests/ and bench/, and everything runs from
# there. Run from the repository instead, `import llama_fast` would find ./llama_fast, which has no
# kernels/ inside: only an install maps it there. A Liger-Kernel wheel in .wheels/ (carried with
# the run) is installed without dependencies, so Liger joins the providers.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

stage() {
  mkdir -p "$1"
  cp -r llama_fast "$1/llama_fast"
  # the C++ extension is not built on a lent GPU; a library built here is for another torch
  rm -rf "$1/llama_fast/kernels" "$1"/llama_fast/_C*.so "$1/llama_fast/_build_info.py"
  cp -r kernels "$1/llama_fast/kernels"
  cp -r tests bench pytest.ini "$1/"
}
if [ "${1:-}" = "--stage" ]; then
  stage "$2"
  exit
fi

OUT=$(realpath -m "${1:-${OUT:-bench/results/$(date -u +%Y-%m-%d)}}")
mkdir -p "$OUT"
STAGE=$(mktemp -d)
stage "$STAGE"
cd "$STAGE"
export PYTHONPATH="$STAGE"
unset TRITON_INTERPRET
ls "$ROOT"/.wheels/liger_kernel-*.whl >/dev/null 2>&1 && pip install -q --no-deps "$ROOT"/.wheels/liger_kernel-*.whl

# At most 8 files come back from a lent machine: two logs, then a JSON and a PNG per suite.
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u; } > "$OUT/gpu_tests.log" 2>&1
cat "$OUT/gpu_tests.log"

# 1. Correctness on the GPU: the same tests as CI, on CUDA tensors, first autotuning config only.
# Attention first: on sm_90 its 16-bit cases take the TMA path (tensor descriptors), which the
# interpreter runs only as plain loads; the rest follow.
LLAMA_FAST_TEST_DEVICE=cuda LLAMA_FAST_AUTOTUNE=0 timeout 180 python -m pytest -q -x -p no:cacheprovider \
  tests/test_attention.py tests/test_attention_varlen.py tests/test_ops.py tests/test_zero_size.py \
  tests/test_transformers_match.py tests/test_patch.py tests/test_packing.py >> "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"

# 1b. torch.compile on the GPU: custom ops (opcheck), the fused loss, fullgraph compiles incl. Inductor with the Triton
# kernels, static-cache decode compiled with mode="reduce-overhead" (CUDA graphs), and no host sync
# under torch.cuda.set_sync_debug_mode("error"). Separate, so a failure here cannot stop the rest.
LLAMA_FAST_TEST_DEVICE=cuda LLAMA_FAST_AUTOTUNE=0 timeout 120 python -m pytest -q -p no:cacheprovider \
  tests/test_compile.py tests/test_custom_ops.py tests/test_linear_cross_entropy.py >> "$OUT/gpu_tests.log" 2>&1
echo "gpu compile tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"

# 2. The suites, autotuned, quick sweeps so that all three fit. The attention suite first measures
# the first call against the steady state and the backward per kernel, then fwd/bwd TFLOP/s vs SDPA
# (Llama-3-8B heads, batch x seq = 16k) and decode GB/s (KV 1k-128k, q_len 1 and 32), and ends with
# the driver's registers and spills (n_spills) of every attention kernel it loaded.
timeout 300 python -m bench all --quick --no-progress --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench: exit $?"
tail -5 "$OUT/bench.log"
cd "$ROOT" && rm -rf "$STAGE"
