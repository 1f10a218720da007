"""flexprefill's operators on raw tensors, step by step (runs in seconds on CPU).

    python examples/torch_ops.py [--device cpu|cuda]

1. select_blocks: FlexPrefill's pattern selection -> a Selection (BlockMask layout);
2. inspect it: which heads are query-aware, density, the blocks of one query block;
3. block_sparse_attention: exact attention over those blocks, with the LSE;
4. the same selection as a torch FlexAttention BlockMask (flexprefill.to_block_mask);
5. flex_prefill_attention: both steps in one op, with return_lse / return_stats;
6. chunked prefill: queries that are the last Nq of Nk positions.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import flexprefill
from flexprefill.workloads import structured_qkv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)

    # q [B, N, Hq, D], k, v [B, N, Hkv, D]: FlashAttention's layout. Heads of four
    # characters (local, sink, topic, diffuse), GQA 2:1.
    B, N, Hq, Hkv, D, bs = 1, 2048, 8, 4, 64, 64
    q, k, v = structured_qkv(B, N, Hq, Hkv, D, dtype=dtype, device=device, topic_len=256)
    print(f"q {tuple(q.shape)}  k/v {tuple(k.shape)}  {dtype}  on {device}")
    print(f"supported here: head dims {flexprefill.supported_head_dims(device)[:4]}..., "
          f"block sizes {flexprefill.supported_block_sizes(device)}")

    # 1. Selection: gamma = attention mass to keep, tau = JSD threshold of the pattern
    #    decision, budgets in tokens.
    sel = flexprefill.select_blocks(q, k, gamma=0.9, tau=0.1, min_budget=256, block_size=bs)
    print("\n1. select_blocks ->", ", ".join(f"{n} {tuple(t.shape)} {str(t.dtype)[6:]}" for n, t in sel._asdict().items()))

    # 2. Inspect it.
    density = sel.density(N, N, bs)[0]  # [Hq]: computed blocks / causal blocks
    for h in range(Hq):
        kind = "query-aware" if sel.query_aware[0, h] else "vertical-slash"
        print(f"   head {h}: {kind:15s} density {density[h]:.2f}")
    r = N // bs - 1
    n = int(sel.kv_count[0, 0, r])
    print(f"   head 0, last query block {r}: {n} of {r + 1} key blocks: {sel.kv_index[0, 0, r, :n].tolist()}")

    # 3. Attention over the selection; the LSE [B, Hq, N] fp32 allows merging chunks.
    out, lse = flexprefill.block_sparse_attention(q, k, v, sel.kv_count, sel.kv_index, block_size=bs)
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    err = (out.float() - dense.float()).abs()
    print(f"\n3. block_sparse_attention: out {tuple(out.shape)}, lse {tuple(lse.shape)}; "
          f"vs dense attention: max |err| {err.max():.3f}, mean {err.mean():.4f}")

    # 4. The same selection as a FlexAttention BlockMask. flex_attention runs eagerly on
    #    CPU (unfused, it materialises the scores: fine at this size); on CUDA, compile it.
    block_mask = flexprefill.to_block_mask(sel, N, N, block_size=bs)
    attend = flex_attention if device.type == "cpu" else torch.compile(flex_attention)
    flex_out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                      enable_gqa=True).transpose(1, 2)
    diff = (flex_out.float() - out.float()).abs().max().item()
    print(f"\n4. to_block_mask -> {block_mask.shape}, sparsity {block_mask.sparsity():.1f}%; "
          f"flex_attention vs block_sparse_attention: max |diff| {diff:.2e}")

    # 5. Fused op: select + attend. Returns out, or (out, lse), (out, selection), (out, lse, selection).
    out5, lse5, stats = flexprefill.flex_prefill_attention(
        q, k, v, gamma=0.9, tau=0.1, min_budget=256, block_size=bs, return_lse=True, return_stats=True)
    same = torch.equal(out5, out) and torch.equal(stats.kv_count, sel.kv_count)
    print(f"\n5. flex_prefill_attention(return_lse, return_stats): same as steps 1+3: {same}; "
          f"mean density {stats.density(N, N, bs).mean():.2f}")

    # 6. Chunked prefill: the last 600 queries after a 1448-token cache (bottom-right causal).
    Nq = 600
    qc = q[:, N - Nq:].contiguous()
    out6, lse6 = flexprefill.flex_prefill_attention(qc, k, v, gamma=0.9, min_budget=256, block_size=bs, return_lse=True)
    mask = torch.arange(N, device=device)[None, :] <= (N - Nq + torch.arange(Nq, device=device))[:, None]
    dense6 = F.scaled_dot_product_attention(
        qc.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True).transpose(1, 2)
    print(f"\n6. chunk of {Nq} queries over {N} keys: out {tuple(out6.shape)}, "
          f"max |err| vs dense {(out6.float() - dense6.float()).abs().max():.3f}, "
          f"lse finite: {bool(torch.isfinite(lse6).all())}, scale 1/sqrt(D) = {1 / math.sqrt(D):.3f}")


if __name__ == "__main__":
    main()
