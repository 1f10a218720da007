"""The foundation demo: flexprefill's fused op on structured inputs, against dense attention.

    python examples/demo_ops.py                                   # moderate length, quick
    python examples/demo_ops.py --seqlen 8192 --heads 9 --kv-heads 3 --head-dim 64
                                                                  # SmolLM2-135M's attention shape

Prints, per head: the character of its inputs, the pattern FlexPrefill chose, the density
(computed blocks / causal blocks) and the error against dense causal attention; then the
time of the fused op (and of its selection alone) against
torch.nn.functional.scaled_dot_product_attention on the same device (CPU here, CUDA when
available or with --device cuda). Inputs come from flexprefill.workloads: heads with
RoPE locality, attention sinks and heavy hitters, topic segments, and diffuse heads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import flexprefill
from flexprefill.workloads import HEAD_KINDS, structured_qkv

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description="FlexPrefill fused op vs dense SDPA on structured inputs")
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--min-budget", type=int, default=1024, help="tokens")
    p.add_argument("--max-budget", type=int, default=None, help="tokens (default: none)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    device = torch.device(a.device)
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(a.seed)
    N, Hq, Hkv, D, bs = a.seqlen, a.heads, a.kv_heads, a.head_dim, a.block_size
    q, k, v = structured_qkv(a.batch, N, Hq, Hkv, D, dtype=dtype, device=device)
    params = dict(gamma=a.gamma, tau=a.tau, min_budget=a.min_budget, max_budget=a.max_budget, block_size=bs)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"B={a.batch} N={N} Hq={Hq} Hkv={Hkv} D={D} {str(dtype)[6:]} on {device}{threads}; "
          f"gamma={a.gamma} tau={a.tau} min_budget={a.min_budget} max_budget={a.max_budget} block_size={bs}")

    def fused():
        return flexprefill.flex_prefill_attention(q, k, v, **params, return_stats=True)

    def select():
        return flexprefill.select_blocks(q, k, **params)

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    out, sel = fused()
    dense = sdpa().transpose(1, 2)  # [B, N, Hq, D]
    density = sel.density(N, N, bs)  # [B, Hq]
    err = (out.float() - dense.float()).abs()  # [B, N, Hq, D]
    rel = err.norm(dim=(1, 3)) / dense.float().norm(dim=(1, 3))  # [B, Hq]

    print(f"\n{'head':>4}  {'inputs':8}  {'pattern':15}  {'density':>7}  {'max|err|':>8}  {'rel. err':>8}")
    group = Hq // Hkv
    for b in range(a.batch):
        for h in range(Hq):
            kind = HEAD_KINDS[(h // group) % len(HEAD_KINDS)]
            pattern = "query-aware" if sel.query_aware[b, h] else "vertical-slash"
            head = f"{h}" if a.batch == 1 else f"{b}/{h}"
            print(f"{head:>4}  {kind:8}  {pattern:15}  {density[b, h]:7.2f}  "
                  f"{err[b, :, h].max():8.4f}  {rel[b, h]:8.4f}")
    print(f"{'all':>4}  {'':8}  {'':15}  {density.mean():7.2f}  {err.max():8.4f}  "
          f"{(err.norm() / dense.float().norm()):8.4f}")

    t_fused = timed(fused, device, a.repeats)
    t_select = timed(select, device, a.repeats)
    t_sdpa = timed(sdpa, device, a.repeats)
    print(f"\n{'op':34}  {'ms':>9}  {'vs SDPA':>7}")
    print(f"{'flex_prefill_attention (fused)':34}  {t_fused:9.1f}  {t_sdpa / t_fused:6.2f}x")
    print(f"{'  of which select_blocks':34}  {t_select:9.1f}")
    print(f"{'scaled_dot_product_attention':34}  {t_sdpa:9.1f}  {1.0:6.2f}x")
    print("(vs SDPA > 1: the fused op is faster; median of "
          f"{a.repeats} runs after a warm-up)")


if __name__ == "__main__":
    main()
