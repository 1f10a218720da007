"""The oracle (flexprefill/reference.py) and the algorithm's promises (design.md §1).

The first tests check the reference's building blocks against PyTorch. The property
tests then check what design.md promises of a selection -- gamma = 1 is dense, sink and
diagonal kept, budgets honoured, slash lines covered for every row they touch, short
inputs dense, tau = 0 disables query-aware heads, structured inputs select both patterns
below density 1 -- on the reference and on the CPU operator alike (`impl`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flexprefill
from flexprefill import reference
from selection_checks import (
    assert_well_formed,
    block_rows,
    block_sets,
    blocks_needed,
    budget_bounds,
    causal_count,
    cdiv,
    default_scale,
    dense_threshold,
    fully_covered,
    random_selection,
    vertical_slash_lines,
)
from structured import structured_qkv
from tolerances import assert_attention_matches, dense_causal_mask

IMPLS = {"reference": reference.select_blocks, "cpu": flexprefill.select_blocks}


@pytest.fixture(params=sorted(IMPLS))
def select(request):
    return IMPLS[request.param]


# ---------------------------------------------------------------------------------------
# Building blocks of the oracle.


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (77, 77), (50, 200), (129, 300)])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 1)])
def test_attention_with_mask_matches_sdpa(Nq, Nk, Hq, Hkv):
    """Dense causal attention of the oracle = PyTorch SDPA with a bottom-right mask."""
    B, D = 2, 32
    q, k, v = torch.randn(B, Nq, Hq, D), torch.randn(B, Nk, Hkv, D), torch.randn(B, Nk, Hkv, D)
    mask = dense_causal_mask(B, Hq, Nq, Nk)
    out, lse = reference.attention_with_mask(q, k, v, mask, dtype=torch.float64)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
        attn_mask=mask, enable_gqa=True,
    ).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.repeat_interleave(Hq // Hkv, 2).double()) / D**0.5
    want_lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_attention_with_mask_empty_rows():
    """A row that sees no key gives output 0 and LSE -inf (not NaN)."""
    q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    mask = dense_causal_mask(1, 2, 8, 8).clone()
    mask[0, 1, 3] = False
    out, lse = reference.attention_with_mask(q, k, v, mask)
    assert torch.equal(out[0, 3, 1], torch.zeros(16)) and torch.isneginf(lse[0, 1, 3])
    assert torch.isfinite(out).all() and torch.isfinite(lse[mask.any(-1)]).all()


@pytest.mark.parametrize("Nq,Nk,bs", [(37, 37, 16), (40, 100, 16), (64, 64, 32), (1, 70, 32)])
def test_expand_block_mask(Nq, Nk, bs):
    """Token mask of a selection, entry by entry: selected block and causal."""
    B, Hq = 2, 3
    kv_count, kv_index = random_selection(B, Hq, Nq, Nk, bs)
    mask = reference.expand_block_mask(kv_count, kv_index, Nq, Nk, bs)
    sets = block_sets(flexprefill.Selection(kv_count, kv_index, torch.zeros(B, Hq, dtype=torch.bool)))
    off = Nk - Nq
    want = torch.zeros(B, Hq, Nq, Nk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            for i in range(Nq):
                for j in range(off + i + 1):
                    want[b, h, i, j] = (j // bs) in sets[b][h][i // bs]
    assert torch.equal(mask, want)


def test_pool_last_block_is_mean_of_valid_rows():
    x = torch.randn(37, 8)
    pooled = reference._pool(x, 16)
    torch.testing.assert_close(pooled, torch.stack([x[:16].mean(0), x[16:32].mean(0), x[32:].mean(0)]))


# ---------------------------------------------------------------------------------------
# Design properties, on the reference and on the CPU operator.

# Structured workload of the property tests: 8 query heads over 4 KV heads of the four
# characters (local, sink, topic, diffuse), bs 32, beyond the dense threshold.
SHAPE = dict(B=1, Nq=512, Nk=512, Hq=8, Hkv=4, D=64, bs=32)


def _structured(Nq=SHAPE["Nq"], Nk=SHAPE["Nk"], **kw):
    s = dict(SHAPE, Nq=Nq, Nk=Nk)
    return structured_qkv(s["B"], Nq, Nk, s["Hq"], s["Hkv"], s["D"], topic_len=2 * s["bs"], **kw)


def test_gamma_one_is_dense(select):
    q, k, _ = _structured()
    bs = SHAPE["bs"]
    sel = select(q, k, gamma=1.0, tau=0.1, min_budget=bs, block_size=bs)
    assert_well_formed(sel, SHAPE["Nq"], SHAPE["Nk"], bs)
    assert torch.equal(sel.kv_count, causal_count(SHAPE["Nq"], SHAPE["Nk"], bs).expand_as(sel.kv_count))


def test_structured_sparse_with_both_patterns(select):
    """gamma < 1 on structured heads: density clearly below 1, sink heads vertical-slash,
    diffuse heads query-aware."""
    q, k, _ = _structured()
    bs, Nq, Nk = SHAPE["bs"], SHAPE["Nq"], SHAPE["Nk"]
    sel = select(q, k, gamma=0.9, tau=0.1, min_budget=bs, block_size=bs)
    assert_well_formed(sel, Nq, Nk, bs)
    density = sel.kv_count.sum(-1).float() / flexprefill.causal_block_count(Nq, Nk, bs)  # [B, Hq]
    assert density.mean() < 0.8, density
    assert density.min() < 0.5, density
    qa = sel.query_aware[0]
    # Heads 2-3 (KV head 1) are sink heads, 6-7 (KV head 3) diffuse.
    assert not qa[2:4].any(), f"sink heads should be vertical-slash, query_aware={qa.tolist()}"
    assert qa[6:8].all(), f"diffuse heads should be query-aware, query_aware={qa.tolist()}"


def test_tau_zero_disables_query_aware(select):
    q, k, _ = _structured()
    bs = SHAPE["bs"]
    sel = select(q, k, gamma=0.9, tau=0.0, min_budget=bs, block_size=bs)
    assert not sel.query_aware.any()
    big = select(q, k, gamma=0.9, tau=10.0, min_budget=bs, block_size=bs)
    assert big.query_aware.all(), "tau above every possible distance (sqrt(ln 2)) must make all heads query-aware"


@pytest.mark.parametrize("gamma,min_budget,max_budget,tau", [
    (0.9, 32, None, 0.1),     # defaults of the sparse path
    (0.99, 0, 64, 0.0),       # max budget binds: 2 columns, 2 slash bins
    (0.3, 160, None, 0.1),    # min budget binds: 5 columns, 5 slash bins
    (0.95, 40, 100, 0.1),     # budgets not multiples of bs
])
@pytest.mark.parametrize("Nq,Nk", [(512, 512), (300, 555)])
def test_lines_and_columns_covered(select, gamma, min_budget, max_budget, tau, Nq, Nk):
    """Re-derive each head's vertical columns and slash lines from design.md (budgets
    applied) and check the selection: it holds every block they need -- each slash line
    for every row it touches -- and, for vertical-slash heads, nothing else."""
    q, k, _ = _structured(Nq, Nk)
    bs, Hq, Hkv = SHAPE["bs"], SHAPE["Hq"], SHAPE["Hkv"]
    sel = select(q, k, gamma=gamma, tau=tau, min_budget=min_budget, max_budget=max_budget, block_size=bs)
    assert_well_formed(sel, Nq, Nk, bs)
    sets = block_sets(sel)
    bounds = budget_bounds(Nk, bs, min_budget, max_budget)
    for h in range(Hq):
        qa = bool(sel.query_aware[0, h])
        cols, bins, lines = vertical_slash_lines(
            q[0, :, h], k[0, :, h // (Hq // Hkv)], gamma=gamma, min_budget=min_budget, max_budget=max_budget,
            bs=bs, scale=default_scale(q.shape[-1]), query_aware=qa,
        )
        assert bounds["min_blocks"] <= int(cols.sum()) <= bounds["max_blocks"]
        assert bounds["min_blocks"] <= int(bins.sum()) <= bounds["max_blocks"]
        need = blocks_needed(cols, lines, Nq, Nk, bs)
        for r in range(cdiv(Nq, bs)):
            missing = need[r] - sets[0][h][r]
            assert not missing, f"head {h} (query_aware={qa}) block {r} misses {sorted(missing)}"
            if not qa:
                extra = sets[0][h][r] - need[r]
                assert not extra, f"vertical-slash head {h} block {r} keeps unneeded blocks {sorted(extra)}"


@pytest.mark.parametrize("min_budget", [64, 200])
def test_min_budget_honoured(select, min_budget):
    """Even with a tiny gamma every head keeps >= ceil(min_budget / bs) whole columns and
    as many whole slash bins of bs lines (counted on the selection's token mask)."""
    Nq = Nk = 512
    bs = SHAPE["bs"]
    q, k, _ = _structured(Nq, Nk)
    sel = select(q, k, gamma=0.05, tau=0.1, min_budget=min_budget, block_size=bs)
    mask = reference.expand_block_mask(sel.kv_count, sel.kv_index, Nq, Nk, bs)
    min_blocks = budget_bounds(Nk, bs, min_budget, None)["min_blocks"]
    # The min_blocks bins hold at least this many distances (the last bin may be short).
    last_bin = Nk - (cdiv(Nk, bs) - 1) * bs
    min_lines = (min_blocks - 1) * bs + last_bin
    for h in range(SHAPE["Hq"]):
        cols, lines = fully_covered(mask[0, h], Nq, Nk, bs)
        assert cols >= min_blocks, f"head {h}: {cols} whole columns < {min_blocks}"
        assert lines >= min_lines, f"head {h}: {lines} whole slash lines < {min_lines}"


def test_max_budget_honoured(select):
    """gamma close to 1 wants many blocks; max_budget caps them: at most max_blocks
    columns and max_blocks slash bins (a bin of bs distances touches at most 3 key blocks
    of a query block) beside the sink and the diagonal, and never more blocks than
    without the cap."""
    q, k, _ = _structured()
    bs, Nq, Nk = SHAPE["bs"], SHAPE["Nq"], SHAPE["Nk"]
    max_budget = 2 * bs
    capped = select(q, k, gamma=0.99, tau=0.0, min_budget=0, max_budget=max_budget, block_size=bs)
    free = select(q, k, gamma=0.99, tau=0.0, min_budget=0, max_budget=None, block_size=bs)
    bounds = budget_bounds(Nk, bs, 0, max_budget)
    assert (capped.kv_count <= free.kv_count).all()
    assert capped.kv_count.sum() < free.kv_count.sum()
    for r in range(cdiv(Nq, bs)):
        lo, hi = block_rows(r, Nq, Nk, bs)
        n_diag = hi // bs - lo // bs + 1
        cap = 1 + n_diag + bounds["max_blocks"] + 3 * bounds["max_blocks"]
        assert (capped.kv_count[..., r] <= cap).all()


@pytest.mark.parametrize("bs,min_budget", [(16, 0), (32, 100), (64, 64)])
def test_short_inputs_are_dense(select, bs, min_budget):
    """Nq <= max(2 bs, min_budget) keeps every causal block whatever gamma; one query
    more takes the sparse path."""
    threshold = dense_threshold(bs, min_budget)
    Nk = threshold + 3 * bs + 5
    q, k, _ = structured_qkv(1, threshold, Nk, 4, 4, 64, kinds=["sink"])
    sel = select(q, k, gamma=0.1, tau=0.1, min_budget=min_budget, block_size=bs)
    assert torch.equal(sel.kv_count, causal_count(threshold, Nk, bs).expand_as(sel.kv_count))
    assert not sel.query_aware.any()
    q, k, _ = structured_qkv(1, threshold + 1, Nk, 4, 4, 64, kinds=["sink"])
    sel = select(q, k, gamma=0.1, tau=0.1, min_budget=min_budget, block_size=bs)
    assert_well_formed(sel, threshold + 1, Nk, bs)
    assert (sel.kv_count < causal_count(threshold + 1, Nk, bs)).any(), "sparse path expected above the threshold"


@pytest.mark.parametrize("Nq,Nk,bs", [(200, 1000, 32), (129, 4097, 64), (333, 333, 16)])
def test_selection_well_formed_random(select, Nq, Nk, bs):
    """Gaussian inputs, chunked offsets not multiples of bs: format, sink and diagonal."""
    q, k = torch.randn(2, Nq, 4, 32), torch.randn(2, Nk, 2, 32)
    sel = select(q, k, gamma=0.9, tau=0.1, min_budget=bs, block_size=bs)
    assert_well_formed(sel, Nq, Nk, bs)


def test_reference_fused_gamma_one_is_dense_attention():
    """The reference's fused op at gamma = 1 = dense causal attention (SDPA), chunked."""
    B, Nq, Nk, Hq, Hkv, D, bs = 2, 100, 230, 4, 2, 64, 16
    q, k, v = structured_qkv(B, Nq, Nk, Hq, Hkv, D)
    out, lse, _ = reference.flex_prefill_attention(q, k, v, gamma=1.0, min_budget=0, block_size=bs)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=dense_causal_mask(B, Hq, Nq, Nk), enable_gqa=True,
    ).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    assert_attention_matches(out, lse, q, k, v, dense_causal_mask(B, Hq, Nq, Nk))
