"""Speed of flexprefill.block_sparse_attention (CUDA) against dense causal attention
(SDPA's cuDNN and flash backends) and against torch.nn.attention.flex_attention fed the
same selection as a BlockMask, all timed in the same run.

Selections look like FlexPrefill's: the sink and the diagonal block of every query block,
plus random other causal blocks, drawn so that density = computed blocks / causal blocks
reaches the target (when the sink and diagonal alone exceed it, the density printed is
the real one). FLOPs count exactly the unmasked (query, key) entries: 4 * D per entry
(2 for Q K^T, 2 for P V), so a diagonal block counts bs * (bs + 1) / 2 entries and dense
causal attention N * (N + 1) / 2 per head.

    python benchmarks/bench_attention.py                      # the default grid
    python benchmarks/bench_attention.py --lengths 32768 --densities 0.1 1.0 --head-dims 128

Writes a JSON file (--out; default $OUT/bench_attention.json when OUT is set, else
./bench_attention.json) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

import flexprefill
from flexprefill import Selection, to_block_mask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cuda_time_ms  # noqa: E402


def time_ms(fn, budget_ms: float = 400.0, max_reps: int = 30) -> float:
    """Median of CUDA-event timings of fn() after one warm-up call; the number of
    repetitions fits a time budget (at least 3)."""
    return cuda_time_ms(fn, warmup=1, budget_ms=budget_ms, max_repeats=max_reps)


def flexprefill_like_selection(B, H, N, bs, density, gen):
    """Sink + diagonal + random other causal blocks (Nq = Nk = N, N a multiple of bs).
    Returns kv_count [B, H, NB] int32, kv_index [B, H, NB, NB] int32 on the GPU."""
    NB = N // bs
    r = torch.arange(NB, device="cuda")
    c = torch.arange(NB, device="cuda")
    causal = c[None, :] <= r[:, None]  # [NB, NB]
    must = (c[None, :] == 0) | (c[None, :] == r[:, None])  # sink and diagonal
    n_causal = NB * (NB + 1) // 2
    n_must = int(must.sum())
    p = min(max((density * n_causal - n_must) / max(n_causal - n_must, 1), 0.0), 1.0)
    sel = torch.rand(B, H, NB, NB, generator=gen, device="cuda") < p
    sel = (sel | must) & causal
    keys = torch.where(sel, c, c + NB)
    order = torch.sort(keys, dim=-1).values
    kv_index = torch.where(order < NB, order, torch.zeros_like(order)).to(torch.int32)
    kv_count = sel.sum(-1).to(torch.int32)
    return kv_count, kv_index


def unmasked_entries(kv_count, kv_index, bs):
    """Exact number of computed (query, key) pairs, summed over batch and heads (Nq = Nk)."""
    NB = kv_index.shape[2]
    r = torch.arange(NB, device=kv_index.device)[None, None, :, None]
    valid = torch.arange(kv_index.shape[3], device=kv_index.device)[None, None, None, :] < kv_count[..., None]
    diag = valid & (kv_index == r)
    full = valid & (kv_index < r)
    return int(full.sum()) * bs * bs + int(diag.sum()) * bs * (bs + 1) // 2


def run_case(N, D, densities, args, gen, flex_compiled):
    B, Hq, Hkv, bs, dtype = 1, args.heads_q, args.heads_kv, args.block_size, torch.bfloat16
    q = torch.randn(B, N, Hq, D, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(B, N, Hkv, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(B, N, Hkv, D, device="cuda", dtype=dtype, generator=gen)
    # Dense baselines in their [B, H, N, D] layout with K/V expanded to Hq heads (done
    # once, outside the timing).
    qt = q.transpose(1, 2).contiguous()
    kt = k.transpose(1, 2).repeat_interleave(Hq // Hkv, 1).contiguous()
    vt = v.transpose(1, 2).repeat_interleave(Hq // Hkv, 1).contiguous()
    dense_flops = 4.0 * D * B * Hq * N * (N + 1) / 2
    rows = []
    dense = {}
    for name, backend in [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]:
        try:
            with sdpa_kernel(backend):
                dense[name] = time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        except RuntimeError as e:  # a backend that does not take this shape is reported, not hidden
            print(f"  {name} unavailable for N={N} D={D}: {str(e).splitlines()[0]}")
            dense[name] = float("nan")
    del kt, vt
    qf = q.transpose(1, 2)  # flex_attention takes [B, H, N, D]
    kf, vf = k.transpose(1, 2), v.transpose(1, 2)
    for density in densities:
        kv_count, kv_index = flexprefill_like_selection(B, Hq, N, bs, density, gen)
        real_density = float(kv_count.sum()) / (B * Hq * (N // bs) * (N // bs + 1) // 2)
        flops = 4.0 * D * unmasked_entries(kv_count, kv_index, bs)
        ours = time_ms(lambda: flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, bs, validate=False))
        t_flex = float("nan")
        if not args.no_flex:
            block_mask = to_block_mask(Selection(kv_count, kv_index, None), N, N, bs)
            try:
                t_flex = time_ms(lambda: flex_compiled(qf, kf, vf, block_mask=block_mask, enable_gqa=True))
            except Exception as e:  # reported in the table as nan, with the reason here
                print(f"  flex_attention failed for N={N} D={D}: {type(e).__name__}: {str(e).splitlines()[0]}")
            del block_mask
        row = {
            "seqlen": N, "head_dim": D, "target_density": density, "density": real_density,
            "ms": ours, "tflops": flops / ours / 1e9,
            "flex_ms": t_flex, "flex_tflops": flops / t_flex / 1e9,
            "sdpa_flash_ms": dense["sdpa_flash"], "sdpa_cudnn_ms": dense["sdpa_cudnn"],
            "sdpa_flash_tflops": dense_flops / dense["sdpa_flash"] / 1e9,
            "sdpa_cudnn_tflops": dense_flops / dense["sdpa_cudnn"] / 1e9,
        }
        rows.append(row)
        print(f"  N={N:6d} D={D:3d} density={real_density:.3f}: ours {ours:8.3f} ms ({row['tflops']:5.0f} TFLOP/s)"
              f"  flex {t_flex:8.3f} ms  flash {dense['sdpa_flash']:8.3f} ms  cudnn {dense['sdpa_cudnn']:8.3f} ms",
              flush=True)
    full = [x for x in rows if x["target_density"] == 1.0]
    for row in rows:
        row["vs_flash"] = row["ms"] / row["sdpa_flash_ms"]
        row["vs_cudnn"] = row["ms"] / row["sdpa_cudnn_ms"]
        row["vs_flex"] = row["ms"] / row["flex_ms"]
        row["linearity"] = row["ms"] / full[0]["ms"] if full else float("nan")
        row["flex_linearity"] = row["flex_ms"] / full[0]["flex_ms"] if full else float("nan")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5, 1.0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128])
    ap.add_argument("--extra-head-dims", type=int, nargs="*", default=[64, 256],
                    help="head dims also measured at --extra-length")
    ap.add_argument("--extra-length", type=int, default=32768)
    ap.add_argument("--heads-q", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--no-flex", action="store_true", help="skip flex_attention (it compiles with Triton)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quiet", action="store_true", help="no table (used for the per-shape processes)")
    args = ap.parse_args()
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "bench_attention.json")

    cases = [(n, d) for d in args.head_dims for n in args.lengths]
    cases += [(args.extra_length, d) for d in args.extra_head_dims if (args.extra_length, d) not in cases]
    t0 = time.time()
    rows = []
    if len(cases) > 1:
        # One fresh process and compile cache per shape, so that flex_attention's
        # compilation for one shape cannot affect another's timing. (Its time for
        # N=32768, D=128 varied between runs on one H200: 24.0 ms in one run, 43.7 ms in
        # three others, in-process or not; the cause is not established.)
        for N, D in cases:
            with tempfile.TemporaryDirectory() as tmp:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))
                part = os.path.join(tmp, "part.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--lengths", str(N), "--head-dims", str(D),
                       "--extra-head-dims", "--densities", *map(str, args.densities),
                       "--heads-q", str(args.heads_q), "--heads-kv", str(args.heads_kv),
                       "--block-size", str(args.block_size), "--out", part, "--quiet"]
                if args.no_flex:
                    cmd.append("--no-flex")
                subprocess.run(cmd, check=True, env=env)
                with open(part) as f:
                    rows += json.load(f)["rows"]
    else:
        gen = torch.Generator(device="cuda")
        gen.manual_seed(0)
        torch._dynamo.reset()
        flex_compiled = torch.compile(flex_attention, dynamic=False)
        N, D = cases[0]
        rows = run_case(N, D, args.densities, args, gen, flex_compiled)
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
        "batch": 1, "heads_q": args.heads_q, "heads_kv": args.heads_kv, "block_size": args.block_size,
        "flops": "4 * head_dim * exact unmasked (query, key) entries", "wall_s": time.time() - t0,
    }
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.quiet:
        return

    print(f"\n{meta['device']}, torch {meta['torch']}, bf16, B=1, Hq={args.heads_q}, Hkv={args.heads_kv}, "
          f"bs={args.block_size}; TFLOP/s over exact unmasked entries; x = our time / theirs")
    print(f"{'N':>7} {'D':>4} {'dens':>6} {'ours ms':>9} {'TF/s':>5} {'lin':>6} {'flex ms':>9} {'flex lin':>8} "
          f"{'x flex':>6} {'x flash':>7} {'x cudnn':>7} {'flash TF/s':>10} {'cudnn TF/s':>10}")
    for r in rows:
        print(f"{r['seqlen']:>7} {r['head_dim']:>4} {r['density']:>6.3f} {r['ms']:>9.3f} {r['tflops']:>5.0f} "
              f"{r['linearity']:>6.3f} {r['flex_ms']:>9.3f} {r['flex_linearity']:>8.3f} {r['vs_flex']:>6.2f} "
              f"{r['vs_flash']:>7.2f} {r['vs_cudnn']:>7.2f} {r['sdpa_flash_tflops']:>10.0f} {r['sdpa_cudnn_tflops']:>10.0f}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
