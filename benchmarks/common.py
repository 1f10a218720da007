"""Timing and reporting helpers shared by the benchmark scripts (GPU timings with CUDA
events, median of repeats after warm-up; tables printed last; JSON for machines)."""

from __future__ import annotations

import json
import os
import statistics
from typing import Callable, Sequence

import torch


def cuda_times_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 10,
                  budget_ms: float | None = None, max_repeats: int = 30) -> list[float]:
    """Wall times of `repeats` calls of fn() on the current CUDA stream, in milliseconds, each
    timed with CUDA events from an idle GPU, after `warmup` calls. With `budget_ms`, the number
    of repeats (3 to max_repeats) is fitted to that time budget from one timed call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()

    def once() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    if budget_ms is not None:
        repeats = max(3, min(max_repeats, int(budget_ms / max(once(), 1e-3))))
    return [once() for _ in range(repeats)]


def cuda_time_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 10,
                 budget_ms: float | None = None, max_repeats: int = 30) -> float:
    """Median of cuda_times_ms (same arguments), in milliseconds."""
    return statistics.median(cuda_times_ms(fn, warmup, repeats, budget_ms, max_repeats))


def causal_flops(seqlen_q: int, seqlen_k: int, heads: int, head_dim: int, batch: int = 1) -> float:
    """FLOPs of causal attention forward (2 matmuls, unmasked entries only)."""
    off = seqlen_k - seqlen_q
    entries = seqlen_q * (off + 1) + seqlen_q * (seqlen_q - 1) / 2  # sum over rows of visible keys
    return 4.0 * batch * heads * head_dim * entries


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def write_json(path: str | None, payload: dict, default_name: str) -> str:
    if path is None:
        path = os.path.join(os.environ.get("OUT", "."), default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def sm_clock_mhz() -> int | None:
    """The current SM clock of the GPU in use (nvidia-smi), or None where it cannot be read.
    Read right after a timing, it shows the clock that timing ran at (the H200 throttles for
    a while after long dense attention runs)."""
    import subprocess

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [x.strip() for x in visible.split(",") if x.strip()]
    try:
        index = torch.cuda.current_device()
        gpu = ids[index] if index < len(ids) else str(index)
        out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return int(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
    except (OSError, RuntimeError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None
