"""The fused op on the GPU as users capture it: in a CUDA graph (no host sync anywhere in
select + attend) and under torch.compile(fullgraph=True); both must equal eager bitwise
(the kernels are deterministic)."""

from __future__ import annotations

import torch

import flexprefill
from flexprefill.workloads import structured_qkv

import pytest

pytestmark = pytest.mark.cuda

ARGS = dict(gamma=0.9, tau=0.1, min_budget=128, max_budget=None, block_size=64)


def inputs(seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return structured_qkv(2, 1500, 8, 2, 128, seqlen_q=1200, device="cuda", generator=gen)


def fused(q, k, v):
    return flexprefill.flex_prefill_attention(q, k, v, return_lse=True, return_stats=True, **ARGS)


def assert_same(got, want, what: str):
    (out, lse, sel), (out_w, lse_w, sel_w) = got, want
    assert torch.equal(out, out_w), f"{what}: outputs differ"
    assert torch.equal(lse, lse_w), f"{what}: LSE differs"
    for a, b in zip(sel, sel_w):
        assert torch.equal(a, b), f"{what}: selections differ"


def test_fused_op_in_cuda_graph():
    q_buf, k_buf, v_buf = (t.clone() for t in inputs(0))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture
        fused(q_buf, k_buf, v_buf)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fused(q_buf, k_buf, v_buf)
    for seed in (1, 2):
        q, k, v = inputs(seed)
        for buf, new in zip((q_buf, k_buf, v_buf), (q, k, v)):
            buf.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(static, fused(q, k, v), f"graph replay (seed {seed}) vs eager")


def test_fused_op_under_torch_compile():
    q, k, v = inputs(3)
    compiled = torch.compile(fused, fullgraph=True)
    assert_same(compiled(q, k, v), fused(q, k, v), "torch.compile vs eager")
