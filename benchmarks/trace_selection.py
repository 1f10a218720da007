"""Trace one flexprefill.select_blocks call on the GPU: every kernel launch, in start order.

Name, duration and start time (torch profiler), on the structured inputs of
bench_selection.py. Shows which kernels overlap (step 4 beside step 5, and on sm_90+ each
kernel's start while its predecessor drains: programmatic dependent launch, so a duration
includes that wait) and where the time goes at one length and head dim;
bench_selection.py --profile gives the per-kernel totals. With --calls N, N calls are
traced one after the other (each from an idle GPU) and each gets a line: every kernel's end
time after the call's first kernel started, so that call-to-call differences in how the
streams share the GPU show.

    python benchmarks/trace_selection.py --seqlen 32768 --head-dim 64 [--calls 8]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import flexprefill

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_selection import ARGS, inputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=32768)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--gaussian", action="store_true", help="Gaussian inputs instead of structured ones")
    ap.add_argument("--calls", type=int, default=1, help="traced calls (one summary line each after the first)")
    a = ap.parse_args()
    if a.calls < 1:
        ap.error(f"--calls must be >= 1, got {a.calls}")
    if a.seqlen < 1 or a.head_dim < 1:
        ap.error(f"--seqlen and --head-dim must be positive, got {a.seqlen} and {a.head_dim}")
    if not torch.cuda.is_available():
        sys.exit("trace_selection.py needs a CUDA GPU")
    q, k, _ = inputs(a.seqlen, a.head_dim, structured=not a.gaussian)
    flexprefill.select_blocks(q, k, **ARGS)  # warm-up
    torch.cuda.synchronize()
    for call in range(a.calls):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            flexprefill.select_blocks(q, k, **ARGS)
            torch.cuda.synchronize()
        events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                        key=lambda e: e.time_range.start)
        t0 = events[0].time_range.start if events else 0
        if call == 0:
            print(f"select_blocks at N={a.seqlen}, D={a.head_dim} ({'Gaussian' if a.gaussian else 'structured'} inputs):")
            print(f"  {'kernel':70s} {'ms':>8s} {'start ms':>9s}")
            for e in events:
                print(f"  {e.name[:70]:70s} {e.device_time / 1000:8.4f} {(e.time_range.start - t0) / 1000:9.3f}")
            if a.calls > 1:
                print("per call: kernel end times (us after the first kernel's start), then the call's span")
        if a.calls > 1:
            ends = " ".join(f"{short_name(e.name)}:{e.time_range.end - t0:.0f}" for e in events)
            span = max((e.time_range.end for e in events), default=t0) - t0
            print(f"  call {call}: {ends}  | span {span:.0f} us")


def short_name(name: str) -> str:
    """flexprefill::selection::qa_estimate_kernel(...) -> qa_estimate"""
    base = name.replace("void ", "").split("(")[0].split("<")[0].split("::")[-1]
    return base[:-len("_kernel")] if base.endswith("_kernel") else base


if __name__ == "__main__":
    main()
