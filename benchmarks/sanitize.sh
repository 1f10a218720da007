#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck on small block_sparse_attention cases (both
# tile shapes, partial blocks, rows that see no key, GQA, Nq < Nk, validate=True) and
# select_blocks cases (sparse, query-aware heads over several CTAs, ties at the cut, short inputs,
# pool(Q) in the rep kernel).
# Fails on any reported error. Needs a GPU and flexprefill importable (PYTHONPATH).
#   bash benchmarks/sanitize.sh
set -euo pipefail

# Without the caching allocator each tensor is its own cudaMalloc, so memcheck sees an
# out-of-bounds access even when it would land inside a cached segment.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

CASE=$(cat <<'PY'
import torch, flexprefill
from flexprefill.reference import cdiv
torch.manual_seed(0)
dims = flexprefill.supported_head_dims("cuda")
for D, bs, dtype in [(128, 128, torch.bfloat16), (128, 64, torch.float16), (max(dims), 128, torch.bfloat16),
                     (min(dims), 64, torch.bfloat16)]:
    B, Nq, Nk, Hq, Hkv = 2, 200, 333, 4, 2
    q = torch.randn(B, Nq, Hq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Nk, Hkv, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Nk, Hkv, D, device="cuda", dtype=dtype)
    NBq, NBk = cdiv(Nq, bs), cdiv(Nk, bs)
    kv_count = torch.randint(0, NBk + 1, (B, Hq, NBq), dtype=torch.int32)
    kv_index = torch.zeros(B, Hq, NBq, NBk, dtype=torch.int32)
    for b in range(B):
        for h in range(Hq):
            for r in range(NBq):
                n = int(kv_count[b, h, r])
                kv_index[b, h, r, :n] = torch.sort(torch.randperm(NBk)[:n]).values
    out, lse = flexprefill.block_sparse_attention(q, k, v, kv_count.cuda(), kv_index.cuda(), bs, validate=True)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
from flexprefill.workloads import structured_qkv
# (D 64 with bs 128: on Hopper the rep kernel also pools Q; 16600 tokens: multi-CTA step 5)
for N, Hq, Hkv, D, bs, tau in [(2500, 4, 4, 64, 64, 0.5), (700, 8, 2, 128, 128, 0.1), (9000, 4, 4, 64, 64, 0.5),
                               (100, 2, 1, 64, 64, 0.1), (3000, 8, 2, 64, 128, 0.3), (16600, 2, 1, 64, 128, 0.5)]:
    q, k, _ = structured_qkv(1, N, Hq, Hkv, D, device="cuda", topic_len=2 * bs)
    sel = flexprefill.select_blocks(q, k, gamma=0.9, tau=tau, min_budget=64, block_size=bs)
    torch.cuda.synchronize()
# every key equal: exact ties at the query-aware cut, ranked across the chunks of several CTAs
q = torch.randn(1, 9000, 2, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16).expand(1, 9000, 1, 64).contiguous()
sel = flexprefill.select_blocks(q, k, gamma=0.9, tau=0.1, min_budget=0, block_size=64)
torch.cuda.synchronize()
print("sanitize case done")
PY
)

status=0
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  if ! compute-sanitizer --tool "$tool" --error-exitcode 1 python3 -c "$CASE" 2>&1 | tee /tmp/sanitize_$tool.log; then
    status=1
  fi
  grep -q "ERROR SUMMARY: 0 errors\|RACECHECK SUMMARY: 0 hazards" /tmp/sanitize_$tool.log || status=1
done
if [ "$status" -ne 0 ]; then echo "compute-sanitizer: FAILED"; else echo "compute-sanitizer: OK"; fi
exit "$status"
