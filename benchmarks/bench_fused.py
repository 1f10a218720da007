"""End-to-end FlexPrefill attention (selection + sparse attention) against dense attention.

On structured inputs (flexprefill.workloads: local, sink/heavy-hitter, topic and diffuse
heads), B=1, Hq=32, Hkv=8, D=128, bf16, it times, in one run:
  - the fused op `flex_prefill_attention` (eager, and replayed from a CUDA graph),
  - selection alone and sparse attention alone,
  - dense SDPA with the cuDNN and flash backends (is_causal=True),
and reports density (computed blocks / causal blocks), the relative L2 error of the output
against dense attention, and speed-ups over cuDNN from the same run.

    python benchmarks/bench_fused.py [--lengths 8192 32768 131072] [--out fused.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import causal_flops, cuda_time_ms, device_name, format_table, write_json  # noqa: E402

import flexprefill  # noqa: E402
from flexprefill.workloads import structured_qkv  # noqa: E402


def dense(q, k, v, backend):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True).transpose(1, 2)


def graphed(fn):
    """Capture fn() once in a CUDA graph; returns a replay function."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--gamma", type=float, default=0.95)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--min-budget", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="8k and 32k only")
    args = ap.parse_args()
    if args.quick:
        args.lengths = [n for n in args.lengths if n <= 32768]
    assert torch.cuda.is_available(), "bench_fused.py needs a CUDA GPU"

    params = dict(gamma=args.gamma, tau=args.tau, min_budget=args.min_budget, block_size=args.block_size)
    rows = []
    for n in args.lengths:
        gen = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = structured_qkv(1, n, args.heads, args.kv_heads, args.head_dim, device="cuda", generator=gen)
        out, sel = flexprefill.flex_prefill_attention(q, k, v, return_stats=True, **params)
        ref = dense(q, k, v, SDPBackend.CUDNN_ATTENTION)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        density = sel.density(n, n, args.block_size).mean().item()
        t_cudnn = cuda_time_ms(lambda: dense(q, k, v, SDPBackend.CUDNN_ATTENTION))
        t_flash = cuda_time_ms(lambda: dense(q, k, v, SDPBackend.FLASH_ATTENTION))
        t_fused = cuda_time_ms(lambda: flexprefill.flex_prefill_attention(q, k, v, **params))
        t_select = cuda_time_ms(lambda: flexprefill.select_blocks(q, k, **params))
        t_attend = cuda_time_ms(
            lambda: flexprefill.block_sparse_attention(q, k, v, sel.kv_count, sel.kv_index, args.block_size, validate=False)
        )
        t_graph = cuda_time_ms(graphed(lambda: flexprefill.flex_prefill_attention(q, k, v, **params)))
        computed = causal_flops(n, n, args.heads, args.head_dim) * density
        rows.append(dict(
            seqlen=n, density=density, rel_err=err, query_aware=sel.query_aware.float().mean().item(),
            cudnn_ms=t_cudnn, flash_ms=t_flash, fused_ms=t_fused, graph_ms=t_graph,
            select_ms=t_select, attend_ms=t_attend,
            speedup_vs_cudnn=t_cudnn / t_fused, speedup_vs_flash=t_flash / t_fused,
            select_share_of_cudnn=t_select / t_cudnn,
            sparse_tflops=computed / (t_attend * 1e-3) / 1e12,
        ))
        del q, k, v, out, ref, sel
        torch.cuda.empty_cache()

    path = write_json(args.out, dict(device=device_name(), args=vars(args), rows=rows), "bench_fused.json")
    print(f"\nflex_prefill_attention vs dense SDPA on {device_name()} (B=1, Hq={args.heads}, Hkv={args.kv_heads}, "
          f"D={args.head_dim}, bf16, gamma={args.gamma}, tau={args.tau}); json: {path}")
    print(format_table(rows, ["seqlen", "density", "rel_err", "query_aware", "cudnn_ms", "flash_ms", "fused_ms",
                              "graph_ms", "select_ms", "attend_ms", "speedup_vs_cudnn", "speedup_vs_flash",
                              "select_share_of_cudnn", "sparse_tflops"]))


if __name__ == "__main__":
    main()
