"""Checks on block selections (design.md §1-2), shared by the test files.

A selection is (kv_count [B, Hq, NBq] int32, kv_index [B, Hq, NBq, NBk] int32,
query_aware [B, Hq] bool). The helpers here re-derive what design.md promises from the
inputs (the vertical and slash lines a head keeps, the blocks those lines need) so that
the reference and the operators are checked against the design, not only each other.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from flexprefill import reference


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_rows(r: int, Nq: int, Nk: int, bs: int) -> tuple[int, int]:
    """Absolute positions [lo, hi] of query block r (the queries are the last Nq)."""
    off = Nk - Nq
    return off + r * bs, off + min(r * bs + bs, Nq) - 1


def causal_count(Nq: int, Nk: int, bs: int) -> torch.Tensor:
    """Number of causal key blocks of every query block: [NBq] int32."""
    return torch.tensor([block_rows(r, Nq, Nk, bs)[1] // bs + 1 for r in range(cdiv(Nq, bs))], dtype=torch.int32)


def assert_same_selection(got, want, what: str = "selection") -> None:
    """kv_count, kv_index (all of it, padding included) and query_aware identical."""
    for name in ("kv_count", "kv_index", "query_aware"):
        a, b = getattr(got, name).cpu(), getattr(want, name).cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}.{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if not torch.equal(a, b):
            bad = (a != b).nonzero()[:5].tolist()
            raise AssertionError(f"{what}.{name} differs at {bad} (first 5 positions)")


def block_sets(sel) -> list:
    """sel as nested lists [b][h][r] of sets of selected key blocks."""
    cnt, idx = sel.kv_count.cpu().tolist(), sel.kv_index.cpu().tolist()
    return [[[set(idx[b][h][r][: cnt[b][h][r]]) for r in range(len(cnt[b][h]))] for h in range(len(cnt[b]))] for b in range(len(cnt))]


def assert_well_formed(sel, Nq: int, Nk: int, bs: int) -> None:
    """Format and invariants every selection satisfies: shapes and dtypes, indices
    ascending and causal, zero padding, the sink (block 0) and the diagonal blocks of
    every query block kept."""
    B, Hq = sel.query_aware.shape
    NBq, NBk = cdiv(Nq, bs), cdiv(Nk, bs)
    assert sel.kv_count.dtype == torch.int32 and sel.kv_index.dtype == torch.int32
    assert sel.query_aware.dtype == torch.bool
    assert tuple(sel.kv_count.shape) == (B, Hq, NBq) and tuple(sel.kv_index.shape) == (B, Hq, NBq, NBk)
    cnt, idx = sel.kv_count.cpu(), sel.kv_index.cpu()
    for r in range(NBq):
        lo, hi = block_rows(r, Nq, Nk, bs)
        must = set(range(lo // bs, hi // bs + 1)) | {0}
        for b in range(B):
            for h in range(Hq):
                n = int(cnt[b, h, r])
                row = idx[b, h, r].tolist()
                assert 1 <= n <= hi // bs + 1, f"kv_count[{b},{h},{r}] = {n} outside [1, {hi // bs + 1}]"
                assert all(x < y for x, y in zip(row[:n], row[1:n])), f"kv_index[{b},{h},{r}] not ascending: {row[:n]}"
                assert row[n - 1] <= hi // bs, f"kv_index[{b},{h},{r}] holds a non-causal block: {row[:n]}"
                assert all(x == 0 for x in row[n:]), f"kv_index[{b},{h},{r}] padding is not 0: {row[n:]}"
                missing = must - set(row[:n])
                assert not missing, f"(b={b}, h={h}, r={r}) misses sink/diagonal blocks {sorted(missing)}"


# ---------------------------------------------------------------------------------------
# Re-derivation of the vertical and slash lines of a head (design.md §1 steps 1-2, 4).


def head_scores(q: torch.Tensor, k: torch.Tensor, bs: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-pooled vertical scores [NBk] and slash scores [Nk] of one head, q [Nq, D],
    k [Nk, D], from the exact attention of the last min(bs, Nq) queries (fp32)."""
    q, k = q.float(), k.float()
    Nq, Nk = q.shape[0], k.shape[0]
    m = min(bs, Nq)
    pos = Nk - m + torch.arange(m)  # absolute positions of the representative rows
    keys = torch.arange(Nk)
    logits = (scale * (q[Nq - m:] @ k.T)).masked_fill(keys[None, :] > pos[:, None], float("-inf"))
    A = torch.softmax(logits, dim=-1)  # [m, Nk]
    vertical = A.mean(0)
    delta = pos[:, None] - keys[None, :]
    valid = delta >= 0
    slash = torch.zeros(Nk).index_add_(0, delta[valid], A[valid]) / m
    pooled = torch.zeros(cdiv(Nk, bs)).index_add_(0, keys // bs, vertical)
    return pooled, slash


def fewest_reaching(scores: torch.Tensor, gamma: float) -> tuple[torch.Tensor, int]:
    """Order by descending score (ties: lower index) and the fewest items reaching gamma."""
    order = torch.sort(scores, descending=True, stable=True).indices
    reached = torch.nonzero(torch.cumsum(scores[order], 0) >= gamma)
    return order, (int(reached[0, 0]) + 1 if reached.numel() else scores.numel())


def budget_bounds(Nk: int, bs: int, min_budget: int, max_budget: Optional[int]) -> dict:
    """Budgets in tokens -> bounds, in blocks, on the key-block columns and (separately)
    on the slash distance bins a head keeps: ceil(tokens / bs), at most NBk."""
    NBk = cdiv(Nk, bs)
    return dict(
        min_blocks=min(cdiv(min_budget, bs), NBk),
        max_blocks=NBk if max_budget is None else min(cdiv(max_budget, bs), NBk),
    )


def vertical_slash_lines(
    q: torch.Tensor, k: torch.Tensor, *, gamma: float, min_budget: int, max_budget: Optional[int],
    bs: int, scale: float, query_aware: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a head keeps in step 4: key-block columns [NBk] bool, slash distance bins
    [NBk] bool (bin t = distances [t*bs, t*bs + bs)), and the slash lines (distances)
    they select [Nk] bool. Columns and bins are each the fewest reaching gamma within
    [min, max] blocks (vertical-slash heads), or only the min-budget ones (query-aware)."""
    pooled, slash = head_scores(q, k, bs, scale)
    Nk = k.shape[0]
    slash_bins = torch.zeros(cdiv(Nk, bs)).index_add_(0, torch.arange(Nk) // bs, slash)
    bounds = budget_bounds(Nk, bs, min_budget, max_budget)

    def keep(scores):
        chosen = torch.zeros(scores.numel(), dtype=torch.bool)
        order, n = fewest_reaching(scores, gamma)
        n = bounds["min_blocks"] if query_aware else max(bounds["min_blocks"], min(n, bounds["max_blocks"]))
        chosen[order[:n]] = True
        return chosen

    cols, bins = keep(pooled), keep(slash_bins)
    return cols, bins, bins[torch.arange(Nk) // bs]


def blocks_needed(cols: torch.Tensor, lines: torch.Tensor, Nq: int, Nk: int, bs: int) -> list[set]:
    """Per query block, the key blocks that the sink, the diagonal, the columns and the
    slash lines need: a line at distance δ needs every block that holds a key p - δ of
    one of the block's rows p (computed row by row, independently of the reference)."""
    deltas = torch.nonzero(lines).flatten()
    result = []
    for r in range(cdiv(Nq, bs)):
        lo, hi = block_rows(r, Nq, Nk, bs)
        need = {0} | set(range(lo // bs, hi // bs + 1))
        need |= {int(c) for c in torch.nonzero(cols).flatten() if c <= hi // bs}
        rows = torch.arange(lo, hi + 1)
        keys = rows[:, None] - deltas[None, :]
        need |= {int(c) for c in (keys[keys >= 0] // bs).unique()}
        result.append(need)
    return result


def fully_covered(mask: torch.Tensor, Nq: int, Nk: int, bs: int) -> tuple[int, int]:
    """From a token mask [Nq, Nk] of one head: the number of key-block columns selected
    for every query row that can see them, and of slash distances δ whose every entry
    (row p, key p - δ) is selected."""
    off = Nk - Nq
    pos = off + torch.arange(Nq)
    causal = torch.arange(Nk)[None, :] <= pos[:, None]
    key_block = torch.arange(Nk) // bs
    cols = 0
    for c in range(cdiv(Nk, bs)):
        in_c = key_block == c
        seen = causal[:, in_c]
        cols += bool((mask[:, in_c] | ~seen).all())
    delta = pos[:, None] - torch.arange(Nk)[None, :]  # [Nq, Nk]
    missing = torch.zeros(Nk, dtype=torch.long)
    sel = causal & ~mask
    missing.index_add_(0, delta[sel], torch.ones(int(sel.sum()), dtype=torch.long))
    lines = int((missing == 0).sum())
    return cols, lines


def random_selection(B: int, Hq: int, Nq: int, Nk: int, bs: int, p_keep: float = 0.5, p_empty: float = 0.1):
    """A random (kv_count, kv_index) in BlockMask layout, with key blocks drawn from ALL
    NBk blocks (non-causal ones included: the kernel masks them), and some query blocks
    keeping nothing (their rows see no key: out 0, lse -inf)."""
    NBq, NBk = cdiv(Nq, bs), cdiv(Nk, bs)
    keep = torch.rand(B, Hq, NBq, NBk) < p_keep
    keep &= ~(torch.rand(B, Hq, NBq, 1) < p_empty)
    kv_count = keep.sum(-1).to(torch.int32)
    # Selected indices first (ascending), then zero padding.
    order = torch.sort((~keep).to(torch.int8) * NBk + torch.arange(NBk), dim=-1).values
    kv_index = torch.where(torch.arange(NBk) < kv_count[..., None], order % NBk, 0).to(torch.int32)
    return kv_count, kv_index


def default_scale(D: int) -> float:
    return 1.0 / math.sqrt(D)


def dense_threshold(bs: int, min_budget: int) -> int:
    return reference.dense_threshold(bs, min_budget)
