"""Time flexprefill.select_blocks (design.md §1 steps 1-5) on the GPU, as a share of dense
causal attention (SDPA, cuDNN backend) on the same inputs, and its extra GPU memory.

    python benchmarks/bench_selection.py --out selection.json

Workloads: B=1, Hq=32, Hkv=8, bf16, block 128, gamma 0.9, tau 0.1, min_budget 1024, at
8k / 32k / 128k / 256k tokens with D=128, and 32k with D=64 and D=256; inputs are the
structured heads of flexprefill.workloads (local, sinks and heavy hitters, topics,
diffuse), generated on the GPU, and, for comparison, Gaussian ones. Times are medians over CUDA
events. Extra memory = peak allocated during the op - allocated before - output bytes.
The SM clock (nvidia-smi) is read right after the structured selection timing and after the
dense one: the configurations run in the order listed, each right after the previous one's
dense attention, so a row can be timed at a clock the GPU throttled to after long dense runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flexprefill

from flexprefill.workloads import structured_qkv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cuda_time_ms, sm_clock_mhz  # noqa: E402

B, HQ, HKV, BS = 1, 32, 8, 128
ARGS = dict(gamma=0.9, tau=0.1, min_budget=1024, block_size=BS)
CONFIGS = [(8192, 128), (32768, 128), (131072, 128), (262144, 128), (32768, 64), (32768, 256)]


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    return cuda_time_ms(fn, warmup=warmup, repeats=reps)


def inputs(n: int, d: int, structured: bool):
    if structured:
        gen = torch.Generator(device="cuda").manual_seed(n + d)
        q, k, v = structured_qkv(B, n, HQ, HKV, d, dtype=torch.bfloat16, device="cuda", generator=gen)
    else:
        q = torch.randn(B, n, HQ, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, n, HKV, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, n, HKV, d, device="cuda", dtype=torch.bfloat16)
    assert q.is_cuda and k.is_cuda and v.is_cuda, "benchmark inputs must live on the GPU"
    return q, k, v


def dense_ms(q, k, v, reps: int) -> tuple[float, str]:
    """Dense causal SDPA with the cuDNN backend: GQA natively if cuDNN takes it, else with
    K and V expanded to the query heads (the same attention). Returns (ms, how)."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        try:
            return median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
                             reps, warmup=1), "cudnn-gqa"
        except RuntimeError as e:
            print(f"  cuDNN refused enable_gqa ({str(e).splitlines()[0][:80]}); expanding K/V")
        group = q.shape[2] // k.shape[2]
        ke, ve = (x.repeat_interleave(group, 1) for x in (kt, vt))
        try:
            return median_ms(lambda: F.scaled_dot_product_attention(qt, ke, ve, is_causal=True), reps,
                             warmup=1), "cudnn-expanded"
        except RuntimeError as e:
            print(f"  cuDNN SDPA unavailable here ({str(e).splitlines()[0][:80]}): timing the flash backend")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # NOT the cuDNN baseline: labelled in the table
        return median_ms(lambda: F.scaled_dot_product_attention(qt, ke, ve, is_causal=True), reps,
                         warmup=1), "FLASH(not cudnn)"


def extra_memory_mib(q, k) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    sel = flexprefill.select_blocks(q, k, **ARGS)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    out_bytes = sum(t.numel() * t.element_size() for t in sel)
    return (peak - before - out_bytes) / 2**20


def profile_kernels(q, k) -> list:
    """Per-kernel CUDA span of one select_blocks call (ms), largest first.

    On sm_90+ the selection kernels after the first are launched as programmatic dependent
    launches: each may start while its predecessor drains and waits for it on the GPU, so
    a span includes that wait and the spans add up to more than the call.
    """
    from torch.profiler import ProfilerActivity, profile
    flexprefill.select_blocks(q, k, **ARGS)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        flexprefill.select_blocks(q, k, **ARGS)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key[:70], t / 1000.0, e.count))
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="selection.json")
    ap.add_argument("--max-n", type=int, default=262144, help="skip longer inputs")
    ap.add_argument("--profile", action="store_true", help="per-kernel spans (every head dim, up to 128k; see profile_kernels)")
    opt = ap.parse_args()
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}")
    results = []
    for n, d in CONFIGS:
        if n > opt.max_n:
            continue
        reps_sel = 20 if n <= 32768 else (10 if n <= 131072 else 5)
        reps_dense = 20 if n <= 8192 else (10 if n <= 32768 else (3 if n <= 131072 else 2))
        row = dict(seqlen=n, head_dim=d)
        for structured in (True, False):
            q, k, v = inputs(n, d, structured)
            ms = median_ms(lambda: flexprefill.select_blocks(q, k, **ARGS), reps_sel)
            clock_sel = sm_clock_mhz() if structured else None  # (after the timing: the clock it ran at)
            sel = flexprefill.select_blocks(q, k, **ARGS)
            density = float(sel.density(n, n, BS).mean())
            tag = "structured" if structured else "gaussian"
            row[f"select_ms_{tag}"] = ms
            row[f"density_{tag}"] = density
            row[f"query_aware_heads_{tag}"] = int(sel.query_aware.sum())
            if structured:
                row["sm_clock_mhz_select"] = clock_sel
                row["dense_cudnn_ms"], row["dense_how"] = dense_ms(q, k, v, reps_dense)
                row["sm_clock_mhz_dense"] = sm_clock_mhz()
                if n == 131072 and d == 128:
                    row["extra_memory_mib"] = extra_memory_mib(q, k)
                if opt.profile and n <= 131072:
                    row["kernels"] = profile_kernels(q, k)
                    print(f"  kernels at {n}, D={d}: " + ", ".join(
                        f"{name.split('(')[0].split('::')[-1].split('<')[0]}{'x' + str(cnt) if cnt > 1 else ''} {t:.3f}"
                        for name, t, cnt in row["kernels"]))
            del q, k, v, sel
            torch.cuda.empty_cache()
        row["share_structured"] = row["select_ms_structured"] / row["dense_cudnn_ms"]
        row["share_gaussian"] = row["select_ms_gaussian"] / row["dense_cudnn_ms"]
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
    with open(opt.out, "w") as f:
        json.dump(dict(device=dev, torch=torch.__version__, config=dict(B=B, Hq=HQ, Hkv=HKV, **ARGS),
                       results=results), f, indent=1)
    print(f"\nselect_blocks vs dense SDPA-cuDNN ({dev}; B=1 Hq=32 Hkv=8 bf16 bs=128 gamma=0.9 tau=0.1)")
    print(f"{'N':>7} {'D':>4} {'dense ms':>9} {'sel ms':>8} {'share':>7} {'target':>6} {'sel ms(gauss)':>13} "
          f"{'share(g)':>8} {'density':>7} {'QA':>3} {'MHz sel/dense':>13} dense")
    for r in results:
        target = 0.15 if r["seqlen"] <= 8192 else 0.02
        print(f"{r['seqlen']:>7} {r['head_dim']:>4} {r['dense_cudnn_ms']:9.2f} {r['select_ms_structured']:8.3f} "
              f"{100 * r['share_structured']:6.2f}% {100 * target:5.0f}% {r['select_ms_gaussian']:13.3f} "
              f"{100 * r['share_gaussian']:7.2f}% {r['density_structured']:7.2f} {r['query_aware_heads_structured']:>3} "
              f"{str(r['sm_clock_mhz_select']) + '/' + str(r['sm_clock_mhz_dense']):>13} {r['dense_how']}")
    for r in results:
        if "extra_memory_mib" in r:
            print(f"extra GPU memory at {r['seqlen']} tokens: {r['extra_memory_mib']:.1f} MiB (target <= 64)")


if __name__ == "__main__":
    main()
