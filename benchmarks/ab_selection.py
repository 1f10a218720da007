"""Time flexprefill.select_blocks alone, for A/B comparisons of builds: one line per run.

Medians (and min, 25th and 75th percentiles) in microseconds over --calls calls, each timed
from an idle GPU with CUDA events as bench_selection.py does, on its structured inputs, at
32k with D=64/128/256 and at 8k with D=128; no dense baseline, so a run takes seconds.
To compare builds, run it once per build in the same device call, interleaving the builds
(e.g. A B B A); only lines from the same call compare. It runs in a fresh process at the
clock the GPU idles at, whereas bench_selection.py times each configuration right after the
previous one's dense attention (a throttled clock): its figures are lower than the
benchmark's and are not shares of dense attention.

    python benchmarks/ab_selection.py --tag main
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

import flexprefill

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_selection import ARGS, inputs  # noqa: E402
from common import cuda_times_ms  # noqa: E402

CONFIGS = [(32768, 64), (32768, 128), (32768, 256), (8192, 128)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="build", help="label of the line (the build under test)")
    ap.add_argument("--calls", type=int, default=40, help="timed calls per configuration")
    a = ap.parse_args()
    if a.calls < 4:
        ap.error(f"--calls must be >= 4, got {a.calls}")
    if not torch.cuda.is_available():
        sys.exit("ab_selection.py needs a CUDA GPU")
    cells = []
    for n, d in CONFIGS:
        q, k, _ = inputs(n, d, structured=True)
        t = sorted(1e3 * ms for ms in cuda_times_ms(lambda: flexprefill.select_blocks(q, k, **ARGS), 3, a.calls))
        cells.append(f"{n // 1024}k/D{d} med {statistics.median(t):5.0f} min {t[0]:5.0f} "
                     f"p25 {t[len(t) // 4]:5.0f} p75 {t[3 * len(t) // 4]:5.0f}")
        del q, k
    print(f"AB {a.tag:8s} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
