#!/usr/bin/env bash
# One call on a GPU machine: build flexprefill for this GPU (unless a prebuilt
# flexprefill/_C.abi3.so is present), run the GPU tests, the compute-sanitizer checks and
# the benchmarks, and print a short table last. Logs and JSON go to $OUT.
#
#   bash benchmarks/gpu_check.sh [quick]      # quick: shorter benchmark grids
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
mode=${1:-full}
status=0
step() { echo; echo "=== $1 ($(date +%T))"; }

step "build"
if [ -f flexprefill/_C.abi3.so ]; then
  echo "using prebuilt flexprefill/_C.abi3.so"
else
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} FLEXPREFILL_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
python3 -c "import torch, flexprefill as f; print(torch.cuda.get_device_name(), 'torch', torch.__version__, '| cuda head dims', f.supported_head_dims('cuda'))"

step "GPU tests"
python3 -m pytest -q -m cuda tests -p no:cacheprovider ${PYTEST_ARGS:--n 4} 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1

for s in benchmarks/sanitize.sh; do
  [ "$mode" = quick ] && break
  [ -f "$s" ] || continue
  step "$s"
  bash "$s" > "$OUT/$(basename "$s" .sh).log" 2>&1 && echo "clean" || { status=1; tail -20 "$OUT/$(basename "$s" .sh).log"; }
done

# quick: no sanitizer, the selection benchmark up to 128k, the attention benchmark at 32k
# only and without flex_attention (which compiles per shape).
if [ "$mode" = quick ]; then
  sel_args=(--max-n 131072); attn_args=(--lengths 32768 --extra-head-dims --no-flex); fused_args=()
else
  sel_args=(); attn_args=(); fused_args=()
fi
bench() {
  local name=$1; shift
  step "$name"
  python3 "benchmarks/$name.py" "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || { status=1; tail -30 "$OUT/$name.log"; }
}
bench bench_selection "${sel_args[@]}"
bench bench_fused "${fused_args[@]}"
bench bench_attention "${attn_args[@]}"

step "summary"
for b in bench_selection bench_fused bench_attention; do
  [ -f "$OUT/$b.log" ] && { echo "--- $b"; tail -n 14 "$OUT/$b.log"; }
done
echo "gpu_check status: $status"
exit $status
