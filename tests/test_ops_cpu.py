"""The CPU operators against the oracle (flexprefill/reference.py).

- select_blocks: kv_count, kv_index (padding included) and query_aware identical;
- block_sparse_attention / flex_prefill_attention: output within FlashAttention's rule
  (tolerances.py), LSE within the table;
over odd lengths, chunked prefill (Nq < Nk, offsets not multiples of the block size),
batches, GQA ratios, head dims and dtypes, on Gaussian and structured inputs; then the
LSE merge property, opcheck, and a hypothesis search over shapes and parameters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexprefill
from flexprefill import reference
from selection_checks import assert_same_selection, assert_well_formed, causal_count, random_selection
from structured import structured_qkv
from tolerances import (
    assert_attention_matches,
    assert_close_flash_rule,
    assert_lse_close,
    dense_causal_mask,
    oracle_attention,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(B, Nq, Nk, Hq, Hkv, D, dtype, structured):
    if structured:
        return structured_qkv(B, Nq, Nk, Hq, Hkv, D, dtype=dtype, topic_len=64)
    return (torch.randn(B, Nq, Hq, D).to(dtype), torch.randn(B, Nk, Hkv, D).to(dtype),
            torch.randn(B, Nk, Hkv, D).to(dtype))


# (B, Nq, Nk, Hq, Hkv, D, bs, dtype, structured, gamma, tau, min_budget, max_budget)
SELECT_CASES = [
    (1, 1, 1, 2, 1, 64, 16, torch.float32, False, 0.9, 0.1, 0, None),        # one token
    (1, 127, 127, 4, 1, 64, 16, torch.bfloat16, True, 0.9, 0.1, 16, None),   # odd, GQA 4
    (1, 129, 129, 8, 1, 64, 32, torch.float16, True, 0.8, 0.1, 0, None),     # odd, GQA 8
    (1, 1000, 1000, 4, 4, 128, 32, torch.bfloat16, True, 0.9, 0.1, 64, 256),  # GQA 1
    (1, 4097, 4097, 2, 1, 64, 64, torch.bfloat16, True, 0.9, 0.1, 64, None),  # long, odd
    (3, 200, 200, 4, 2, 80, 16, torch.float32, True, 0.95, 0.2, 32, None),    # batch 3, D 80
    (2, 130, 1000, 4, 2, 96, 32, torch.float16, True, 0.9, 0.1, 32, None),    # chunk, off % bs != 0
    (1, 333, 4097, 2, 2, 256, 64, torch.bfloat16, True, 0.9, 0.1, 64, 512),  # chunk, D 256
    (2, 300, 317, 4, 4, 64, 16, torch.float32, False, 0.9, 0.1, 16, None),    # Gaussian, chunk
    (1, 600, 600, 8, 2, 64, 64, torch.float32, True, 0.5, 0.0, 0, 64),        # tau 0, tight budget
    (1, 700, 777, 4, 1, 32, 128, torch.bfloat16, True, 0.95, 0.1, 128, None),  # default bs
]


def _case_id(case):
    B, Nq, Nk, Hq, Hkv, D, bs, dtype, structured, *_ = case
    return f"B{B}-q{Nq}-k{Nk}-h{Hq}/{Hkv}-d{D}-bs{bs}-{str(dtype)[6:]}-{'struct' if structured else 'gauss'}"


@pytest.mark.parametrize("case", SELECT_CASES, ids=_case_id)
def test_select_blocks_matches_reference(case):
    B, Nq, Nk, Hq, Hkv, D, bs, dtype, structured, gamma, tau, min_budget, max_budget = case
    q, k, _ = make_inputs(B, Nq, Nk, Hq, Hkv, D, dtype, structured)
    args = dict(gamma=gamma, tau=tau, min_budget=min_budget, max_budget=max_budget, block_size=bs)
    got = flexprefill.select_blocks(q, k, **args)
    want = reference.select_blocks(q, k, **args)
    assert_same_selection(got, want)
    assert_well_formed(got, Nq, Nk, bs)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("Nq,Nk,Hq,Hkv,D,bs", [
    (1, 1, 2, 1, 64, 16),
    (1, 1000, 4, 1, 64, 32),     # decode-like: one query over many keys
    (127, 127, 4, 4, 128, 16),
    (129, 129, 8, 1, 80, 32),
    (100, 1000, 4, 2, 256, 64),  # chunk, off % bs != 0
    (257, 300, 2, 2, 96, 128),
])
def test_block_sparse_attention_matches_reference(dtype, Nq, Nk, Hq, Hkv, D, bs):
    """Random selections over all key blocks (non-causal ones included, some query blocks
    empty): output by the rule, LSE by the table, empty rows 0 / -inf."""
    B = 2
    q, k, v = make_inputs(B, Nq, Nk, Hq, Hkv, D, dtype, structured=False)
    kv_count, kv_index = random_selection(B, Hq, Nq, Nk, bs)
    out, lse = flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, block_size=bs)
    mask = reference.expand_block_mask(kv_count, kv_index, Nq, Nk, bs)
    assert_attention_matches(out, lse, q, k, v, mask)
    empty = ~mask.any(-1)  # [B, Hq, Nq]
    assert torch.isneginf(lse[empty]).all()
    assert (out.transpose(1, 2)[empty] == 0).all()


@pytest.mark.parametrize("case", SELECT_CASES, ids=_case_id)
def test_flex_prefill_attention_matches_reference(case):
    """The fused op: the reference's selection, and its attention under that selection."""
    B, Nq, Nk, Hq, Hkv, D, bs, dtype, structured, gamma, tau, min_budget, max_budget = case
    q, k, v = make_inputs(B, Nq, Nk, Hq, Hkv, D, dtype, structured)
    args = dict(gamma=gamma, tau=tau, min_budget=min_budget, max_budget=max_budget, block_size=bs)
    out, lse, sel = flexprefill.flex_prefill_attention(q, k, v, **args, return_lse=True, return_stats=True)
    want = reference.select_blocks(q, k, **args)
    assert_same_selection(sel, want)
    mask = reference.expand_block_mask(want.kv_count, want.kv_index, Nq, Nk, bs)
    assert_attention_matches(out, lse, q, k, v, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("Nq,Nk", [(300, 300), (150, 413)])
def test_gamma_one_equals_dense_attention(dtype, Nq, Nk):
    """gamma = 1: every causal block, and the output of dense causal attention. PyTorch's
    SDPA in the input dtype is the 'same-dtype' computation of the rule."""
    B, Hq, Hkv, D, bs = 2, 8, 2, 64, 32
    q, k, v = structured_qkv(B, Nq, Nk, Hq, Hkv, D, dtype=dtype)
    out, lse, sel = flexprefill.flex_prefill_attention(
        q, k, v, gamma=1.0, min_budget=bs, block_size=bs, return_lse=True, return_stats=True)
    assert torch.equal(sel.kv_count, causal_count(Nq, Nk, bs).expand_as(sel.kv_count))
    mask = dense_causal_mask(B, Hq, Nq, Nk)
    sdpa = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
    ).transpose(1, 2)
    out_ref, lse_ref, _ = oracle_attention(q, k, v, mask)
    assert_close_flash_rule(out, out_ref, sdpa)
    assert_lse_close(lse, lse_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("Nq,Nk,bs", [(200, 200, 16), (97, 555, 32), (1, 300, 64)])
def test_lse_merges_two_key_halves(dtype, Nq, Nk, bs):
    """The LSE lets partial results merge: attention over the key blocks before a split
    and over those after it, merged by their LSEs, equals attention over all of them."""
    B, Hq, Hkv, D = 2, 4, 2, 64
    q, k, v = structured_qkv(B, Nq, Nk, Hq, Hkv, D, dtype=dtype, topic_len=2 * bs)
    kv_count, kv_index = random_selection(B, Hq, Nq, Nk, bs, p_keep=0.7, p_empty=0.0)
    split = int(torch.randint(1, max(2, -(-Nk // bs)), ()))  # first key block of the second half
    valid = torch.arange(kv_index.shape[-1]) < kv_count[..., None]

    def part(keep):
        keep = valid & keep
        count = keep.sum(-1).to(torch.int32)
        order = torch.sort(torch.where(keep, kv_index, 1 << 30), dim=-1).values
        index = torch.where(torch.arange(kv_index.shape[-1]) < count[..., None], order, 0).to(torch.int32)
        return flexprefill.block_sparse_attention(q, k, v, count, index, block_size=bs)

    out1, lse1 = part(kv_index < split)
    out2, lse2 = part(kv_index >= split)
    lse = torch.logaddexp(lse1, lse2)  # [B, Hq, Nq]
    safe = torch.where(torch.isneginf(lse), 0.0, lse)
    w1 = torch.exp(lse1 - safe).transpose(1, 2)[..., None]  # [B, Nq, Hq, 1]
    w2 = torch.exp(lse2 - safe).transpose(1, 2)[..., None]
    merged = (w1 * out1.double() + w2 * out2.double()).to(dtype)

    out, lse_all = flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, block_size=bs)
    assert_lse_close(lse, lse_all, dtype, what="merged lse")
    mask = reference.expand_block_mask(kv_count, kv_index, Nq, Nk, bs)
    out_ref, _, out_torch = oracle_attention(q, k, v, mask)
    assert_close_flash_rule(merged, out_ref, out_torch, what="merged out")
    if dtype == torch.float32:
        torch.testing.assert_close(merged, out, atol=2e-6, rtol=2e-5)


def test_strided_inputs_match_contiguous():
    """q, k, v as views of a packed [B, N, 3, H, D] projection (strided sequence and head
    dims) give bit-identical results to contiguous copies."""
    B, N, H, D, bs = 2, 300, 4, 64, 32
    qkv = structured_qkv(B, N, N, H, H, D)
    packed = torch.stack(qkv, dim=2)  # [B, N, 3, H, D]
    q, k, v = packed.unbind(2)
    assert not q.is_contiguous()
    args = dict(gamma=0.9, tau=0.1, min_budget=bs, block_size=bs, return_lse=True, return_stats=True)
    out_s, lse_s, sel_s = flexprefill.flex_prefill_attention(q, k, v, **args)
    out_c, lse_c, sel_c = flexprefill.flex_prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), **args)
    assert_same_selection(sel_s, sel_c)
    assert torch.equal(out_s, out_c) and torch.equal(lse_s, lse_c)
    assert out_s.is_contiguous()


@pytest.mark.parametrize("scale", [0.05, 0.3])
def test_softmax_scale(scale):
    B, Nq, Nk, Hq, Hkv, D, bs = 1, 300, 400, 4, 2, 64, 32
    q, k, v = structured_qkv(B, Nq, Nk, Hq, Hkv, D, dtype=torch.bfloat16)
    args = dict(gamma=0.9, tau=0.1, min_budget=bs, block_size=bs, softmax_scale=scale)
    out, lse, sel = flexprefill.flex_prefill_attention(q, k, v, **args, return_lse=True, return_stats=True)
    want = reference.select_blocks(q, k, **args)
    assert_same_selection(sel, want)
    mask = reference.expand_block_mask(want.kv_count, want.kv_index, Nq, Nk, bs)
    assert_attention_matches(out, lse, q, k, v, mask, softmax_scale=scale)


def test_fused_op_equals_select_then_attend_and_is_deterministic():
    q, k, v = structured_qkv(2, 400, 450, 8, 2, 64, dtype=torch.bfloat16)
    args = dict(gamma=0.9, tau=0.1, min_budget=32, block_size=32)
    out, lse, sel = flexprefill.flex_prefill_attention(q, k, v, **args, return_lse=True, return_stats=True)
    sel2 = flexprefill.select_blocks(q, k, **args)
    out2, lse2 = flexprefill.block_sparse_attention(q, k, v, sel2.kv_count, sel2.kv_index, block_size=32)
    assert_same_selection(sel, sel2)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    out3 = flexprefill.flex_prefill_attention(q, k, v, **args)
    assert torch.equal(out, out3)


def test_wrapper_return_forms():
    q, k, v = structured_qkv(1, 100, 100, 2, 1, 64)
    out = flexprefill.flex_prefill_attention(q, k, v, block_size=16, min_budget=16)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    out_l, lse = flexprefill.flex_prefill_attention(q, k, v, block_size=16, min_budget=16, return_lse=True)
    assert lse.shape == (1, 2, 100) and lse.dtype == torch.float32
    out_s, sel = flexprefill.flex_prefill_attention(q, k, v, block_size=16, min_budget=16, return_stats=True)
    assert isinstance(sel, flexprefill.Selection)
    assert torch.equal(out, out_l) and torch.equal(out, out_s)
    density = sel.density(100, 100, 16)
    assert density.shape == (1, 2) and ((density > 0) & (density <= 1)).all()
    only_out = flexprefill.block_sparse_attention(q, k, v, sel.kv_count, sel.kv_index, block_size=16, return_lse=False)
    assert torch.equal(only_out, out)


# ---------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake kernels, dispatch and aot_autograd consistency.


def _opcheck_samples():
    q, k, v = structured_qkv(1, 150, 200, 4, 2, 64, dtype=torch.bfloat16)
    sel = flexprefill.select_blocks(q, k, gamma=0.9, tau=0.1, min_budget=16, block_size=32)
    q32, k32, v32 = torch.randn(2, 40, 2, 32), torch.randn(2, 70, 1, 32), torch.randn(2, 70, 1, 32)
    return [
        ("select_blocks", (q, k, 0.9, 0.1, 16, None, 32, None)),
        ("select_blocks", (q32, k32, 0.8, 0.0, 0, 32, 16, 0.2)),
        ("block_sparse_attention", (q, k, v, sel.kv_count, sel.kv_index, 32, None, True)),
        ("block_sparse_attention", (q32, k32, v32, *random_selection(2, 2, 40, 70, 16), 16, 0.3, False)),
        ("flex_prefill_attention", (q, k, v, 0.9, 0.1, 16, None, 32, None)),
        ("flex_prefill_attention", (q32, k32, v32, 1.0, 0.1, 0, 64, 16, None)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_opcheck(index):
    name, args = _opcheck_samples()[index]
    torch.library.opcheck(getattr(torch.ops.flexprefill, name).default, args)


# ---------------------------------------------------------------------------------------
# Property-based search over shapes, dtypes and parameters.


@st.composite
def problems(draw):
    bs = draw(st.sampled_from([16, 32, 64]))
    Nk = draw(st.integers(1, 700))
    Nq = draw(st.integers(1, Nk))
    Hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([16, 64, 80, 128]))
    min_budget = draw(st.sampled_from([0, bs // 2, bs, 3 * bs]))
    max_budget = draw(st.one_of(st.none(), st.integers(max(1, min_budget), 8 * bs)))
    return dict(
        B=draw(st.integers(1, 2)), Nq=Nq, Nk=Nk, Hq=Hkv * group, Hkv=Hkv, D=D, bs=bs,
        dtype=draw(st.sampled_from(DTYPES)), structured=draw(st.booleans()),
        gamma=draw(st.sampled_from([0.3, 0.7, 0.9, 0.95, 1.0])), tau=draw(st.sampled_from([0.0, 0.05, 0.1, 0.5])),
        min_budget=min_budget, max_budget=max_budget, seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_property_fused_op_matches_reference(p):
    torch.manual_seed(p["seed"])
    q, k, v = make_inputs(p["B"], p["Nq"], p["Nk"], p["Hq"], p["Hkv"], p["D"], p["dtype"], p["structured"])
    args = dict(gamma=p["gamma"], tau=p["tau"], min_budget=p["min_budget"], max_budget=p["max_budget"],
                block_size=p["bs"])
    out, lse, sel = flexprefill.flex_prefill_attention(q, k, v, **args, return_lse=True, return_stats=True)
    want = reference.select_blocks(q, k, **args)
    assert_same_selection(sel, want)
    assert_well_formed(sel, p["Nq"], p["Nk"], p["bs"])
    mask = reference.expand_block_mask(want.kv_count, want.kv_index, p["Nq"], p["Nk"], p["bs"])
    assert_attention_matches(out, lse, q, k, v, mask)


# ---------------------------------------------------------------------------------------
# Interoperation with torch FlexAttention.


@pytest.mark.parametrize("Nq,Nk,bs", [(256, 256, 32), (100, 333, 16), (300, 300, 128)])
def test_to_block_mask_with_flex_attention(Nq, Nk, bs):
    """flex_attention with flexprefill.to_block_mask computes block_sparse_attention's
    result (eager flex_attention, which applies the mask_mod, not the block structure)."""
    from torch.nn.attention.flex_attention import flex_attention

    B, Hq, Hkv, D = 2, 4, 2, 64
    q, k, v = structured_qkv(B, Nq, Nk, Hq, Hkv, D, topic_len=2 * bs)
    sel = flexprefill.select_blocks(q, k, gamma=0.7, tau=0.1, min_budget=0, block_size=bs)
    out, _ = flexprefill.block_sparse_attention(q, k, v, sel.kv_count, sel.kv_index, block_size=bs)
    block_mask = flexprefill.to_block_mask(sel, Nq, Nk, block_size=bs)
    flex_out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                              enable_gqa=True).transpose(1, 2)
    mask = reference.expand_block_mask(sel.kv_count, sel.kv_index, Nq, Nk, bs)
    out_ref, _, out_torch = oracle_attention(q, k, v, mask)
    assert_close_flash_rule(flex_out, out_ref, out_torch, what="flex_attention")
    torch.testing.assert_close(flex_out, out, atol=1e-5, rtol=1e-5)
