"""torch.compile and fake tensors: the ops trace without graph breaks, their fake kernels
give the real kernels' shapes and dtypes, and compiled code computes what eager does."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch._subclasses.fake_tensor import FakeTensorMode

import flexprefill
from selection_checks import assert_same_selection
from structured import structured_qkv

ARGS = dict(gamma=0.9, tau=0.1, min_budget=32, block_size=32)


def run_all(q, k, v):
    """Every op, with the Python wrappers and their NamedTuple, as a model would call them."""
    sel = flexprefill.select_blocks(q, k, **ARGS)
    out, lse = flexprefill.block_sparse_attention(q, k, v, sel.kv_count, sel.kv_index, block_size=32)
    fused, fused_lse, stats = flexprefill.flex_prefill_attention(q, k, v, **ARGS, return_lse=True, return_stats=True)
    return out, lse, sel, fused, fused_lse, stats


@pytest.mark.parametrize("B,Nq,Nk,Hq,Hkv,D", [(1, 300, 300, 4, 2, 64), (2, 77, 1000, 8, 1, 128), (1, 0, 5, 2, 2, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_kernels_match_real_shapes(B, Nq, Nk, Hq, Hkv, D, dtype):
    real = [torch.randn(B, Nq, Hq, D, dtype=dtype), torch.randn(B, Nk, Hkv, D, dtype=dtype),
            torch.randn(B, Nk, Hkv, D, dtype=dtype)]
    want = run_all(*real)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real]
        got = run_all(*fake)
    flat_want = [t for x in want for t in (x if isinstance(x, tuple) else (x,))]
    flat_got = [t for x in got for t in (x if isinstance(x, tuple) else (x,))]
    assert len(flat_got) == len(flat_want) == 10
    for g, w in zip(flat_got, flat_want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.device == w.device, (g, w.shape, w.dtype)


def test_meta_tensors_give_shapes():
    q = torch.empty(2, 130, 8, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 200, 2, 64, device="meta", dtype=torch.bfloat16)
    out, lse, sel = flexprefill.flex_prefill_attention(q, k, k, block_size=64, return_lse=True, return_stats=True)
    assert out.shape == (2, 130, 8, 64) and out.device.type == "meta" and out.dtype == torch.bfloat16
    assert lse.shape == (2, 8, 130) and lse.dtype == torch.float32
    assert sel.kv_count.shape == (2, 8, 3) and sel.kv_index.shape == (2, 8, 3, 4)
    assert sel.query_aware.shape == (2, 8) and sel.query_aware.dtype == torch.bool


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    """fullgraph=True fails on any graph break; results equal eager's (the ops are
    opaque to the compiler, so inductor only fuses the code around them)."""
    torch._dynamo.reset()

    def model(q, k, v):
        q = q * 1.0  # some traced work around the ops
        out, lse, sel = flexprefill.flex_prefill_attention(q, k, v, **ARGS, return_lse=True, return_stats=True)
        dense = sel.kv_count.sum(-1).float() / flexprefill.causal_block_count(q.shape[1], k.shape[1], 32)
        out2, _ = flexprefill.block_sparse_attention(q, k, v, sel.kv_count, sel.kv_index, block_size=32)
        return out + out2, lse.exp().sum(), dense, sel.query_aware

    q, k, v = structured_qkv(1, 300, 333, 4, 2, 64)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got, want = compiled(q, k, v), model(q, k, v)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0) if g.dtype == torch.bool else torch.testing.assert_close(g, w)


def test_compile_dynamic_shapes():
    """One dynamic-shape graph serves several sequence lengths (no recompilation error)."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(fullgraph=True, dynamic=True, backend=counter)
    def step(q, k, v):
        sel = flexprefill.select_blocks(q, k, **ARGS)
        out, lse = flexprefill.block_sparse_attention(q, k, v, sel.kv_count, sel.kv_index, block_size=32)
        return out, lse, sel.kv_count, sel.kv_index

    for Nq, Nk in [(100, 150), (257, 300), (300, 300)]:
        q, k, v = structured_qkv(1, Nq, Nk, 4, 2, 64)
        out, lse, cnt, idx = step(q, k, v)
        sel = flexprefill.select_blocks(q, k, **ARGS)
        assert_same_selection(flexprefill.Selection(cnt, idx, sel.query_aware), sel)
        want, want_lse = flexprefill.block_sparse_attention(q, k, v, sel.kv_count, sel.kv_index, block_size=32)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert counter.frame_count == 1, f"recompiled {counter.frame_count} times"
