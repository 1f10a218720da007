"""Every invalid input is refused with a message that says what was wrong (and what is
supported); empty inputs are valid and give empty outputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch._C import DispatchKey, DispatchKeySet

import flexprefill

BS = 16


def qkv(B=1, Nq=64, Nk=64, Hq=4, Hkv=2, D=64, dtype=torch.float32):
    return torch.randn(B, Nq, Hq, D, dtype=dtype), torch.randn(B, Nk, Hkv, D, dtype=dtype), torch.randn(B, Nk, Hkv, D, dtype=dtype)


def selection(q, k):
    return flexprefill.select_blocks(q, k, gamma=0.9, tau=0.1, min_budget=0, block_size=BS)


def select(q, k, **kw):
    args = dict(gamma=0.9, tau=0.1, min_budget=0, block_size=BS)
    args.update(kw)
    return flexprefill.select_blocks(q, k, **args)


def attend(q, k, v, kv_count=None, kv_index=None, **kw):
    if kv_count is None:
        sel = selection(q, k)
        kv_count, kv_index = sel.kv_count, sel.kv_index
    return flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, block_size=kw.pop("block_size", BS), **kw)


def fused(q, k, v, **kw):
    args = dict(gamma=0.9, tau=0.1, min_budget=0, block_size=BS)
    args.update(kw)
    return flexprefill.flex_prefill_attention(q, k, v, **args)


# Each op on (q, k, v): the checks of q/k/v are shared, so every op must give them.
OPS = {
    "select_blocks": lambda q, k, v: select(q, k),
    "block_sparse_attention": lambda q, k, v: flexprefill.block_sparse_attention(
        q, k, v, torch.zeros(q.shape[0], q.shape[2], -(-q.shape[1] // BS), dtype=torch.int32),
        torch.zeros(q.shape[0], q.shape[2], -(-q.shape[1] // BS), max(1, -(-k.shape[1] // BS)), dtype=torch.int32),
        block_size=BS),
    "flex_prefill_attention": lambda q, k, v: fused(q, k, v),
}


@pytest.fixture(params=sorted(OPS))
def op(request):
    return OPS[request.param]


def test_wrong_rank(op):
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"q must have rank 4 \[batch, seqlen_q, heads_q, head_dim\]"):
        op(q[0], k, v)
    with pytest.raises(RuntimeError, match=r"k must have rank 4"):
        op(q, k[0], v)


def test_v_wrong_rank_or_shape():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"v must have rank 4"):
        fused(q, k, v[0])
    with pytest.raises(RuntimeError, match=r"k and v must have the same shape"):
        fused(q, k, v[:, :32])
    sel = selection(q, k)
    with pytest.raises(RuntimeError, match=r"k and v must have the same shape"):
        attend(q, k, torch.randn(1, 64, 2, 32), sel.kv_count, sel.kv_index)


def test_mismatched_batch(op):
    q, k, v = qkv()
    k2, v2 = torch.randn(2, 64, 2, 64), torch.randn(2, 64, 2, 64)
    with pytest.raises(RuntimeError, match=r"q and k must have the same batch size, got 1 and 2"):
        op(q, k2, v2)


def test_mismatched_head_dim(op):
    q, k, v = qkv()
    k2, v2 = torch.randn(1, 64, 2, 32), torch.randn(1, 64, 2, 32)
    with pytest.raises(RuntimeError, match=r"q and k must have the same head_dim, got 64 and 32"):
        op(q, k2, v2)


def test_heads_not_a_multiple(op):
    q, k, v = qkv(Hq=3, Hkv=2)
    with pytest.raises(RuntimeError, match=r"heads_q must be a positive multiple of heads_kv.*heads_q=3, heads_kv=2"):
        op(q, k, v)


def test_mixed_dtypes(op):
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"q and k must have the same dtype, got Float and BFloat16"):
        op(q, k.bfloat16(), v.bfloat16())
    if op is not OPS["select_blocks"]:  # select_blocks takes no v
        with pytest.raises(RuntimeError, match=r"q and v must have the same dtype, got Float and Half"):
            op(q, k, v.half())


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.int8])
def test_unsupported_dtype(op, dtype):
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"unsupported dtype .* on CPU; supported: float32, bfloat16, float16"):
        op(q.to(dtype), k.to(dtype), v.to(dtype))


@pytest.mark.parametrize("head_dim", [4, 60, 264, 512])
def test_unsupported_head_dim(op, head_dim):
    q, k, v = qkv(D=head_dim)
    dims = ", ".join(str(d) for d in flexprefill.supported_head_dims("cpu"))
    with pytest.raises(RuntimeError, match=rf"unsupported head_dim {head_dim} on CPU; supported: {dims}$"):
        op(q, k, v)


@pytest.mark.parametrize("block_size", [0, -16, 8, 48, 256])
def test_unsupported_block_size(block_size):
    q, k, v = qkv()
    sizes = ", ".join(str(s) for s in flexprefill.supported_block_sizes("cpu"))
    match = rf"unsupported block_size {block_size} on CPU; supported: {sizes}"
    with pytest.raises(RuntimeError, match=match):
        select(q, k, block_size=block_size)
    with pytest.raises(RuntimeError, match=match):
        fused(q, k, v, block_size=block_size)
    with pytest.raises(RuntimeError, match=match):
        attend(q, k, v, torch.zeros(1, 4, 4, dtype=torch.int32), torch.zeros(1, 4, 4, 4, dtype=torch.int32),
               block_size=block_size)


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_gamma_out_of_range(gamma):
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"gamma must be in \(0, 1\], got"):
        select(q, k, gamma=gamma)
    with pytest.raises(RuntimeError, match=r"gamma must be in \(0, 1\], got"):
        fused(q, k, v, gamma=gamma)


@pytest.mark.parametrize("tau", [-0.01, -1.0, math.nan, math.inf])
def test_tau_invalid(tau):
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"tau must be a finite number >= 0, got"):
        select(q, k, tau=tau)
    with pytest.raises(RuntimeError, match=r"tau must be a finite number >= 0, got"):
        fused(q, k, v, tau=tau)


def test_budgets_invalid():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"min_budget \(512\) must be <= max_budget \(256\)"):
        select(q, k, min_budget=512, max_budget=256)
    with pytest.raises(RuntimeError, match=r"min_budget \(512\) must be <= max_budget \(256\)"):
        fused(q, k, v, min_budget=512, max_budget=256)
    with pytest.raises(RuntimeError, match=r"min_budget must be >= 0 tokens, got -1"):
        select(q, k, min_budget=-1)
    with pytest.raises(RuntimeError, match=r"max_budget must be >= 1 token \(or None\), got 0"):
        select(q, k, max_budget=0)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf])
def test_softmax_scale_invalid(scale):
    q, k, v = qkv()
    match = r"softmax_scale must be a finite number > 0 \(or None for 1/sqrt\(head_dim\)\)"
    with pytest.raises(RuntimeError, match=match):
        select(q, k, softmax_scale=scale)
    with pytest.raises(RuntimeError, match=match):
        attend(q, k, v, softmax_scale=scale)


def test_seqlen_q_longer_than_k(op):
    q, k, v = qkv(Nq=65, Nk=64)
    with pytest.raises(RuntimeError, match=r"seqlen_q \(65\) must be <= seqlen_k \(64\): the queries are the last"):
        op(q, k, v)


def test_head_dim_not_contiguous(op):
    q, k, v = qkv()
    q_strided = torch.randn(1, 64, 64, 4).transpose(2, 3)  # [1, 64, 4, 64], head_dim stride 4
    with pytest.raises(RuntimeError, match=r"head_dim of q, k and v must be contiguous \(stride 1\).*\.contiguous\(\)"):
        op(q_strided, k, v)


# ---------------------------------------------------------------------------------------
# Selections handed to block_sparse_attention.


def test_kv_index_out_of_range():
    q, k, v = qkv()
    sel = selection(q, k)  # NBk = 4
    idx = sel.kv_index.clone()
    idx[0, 1, 2, int(sel.kv_count[0, 1, 2]) - 1] = 4
    with pytest.raises(RuntimeError, match=r"kv_index\[0, 1, 2, \d+\] = 4 is out of range \[0, 4\)"):
        attend(q, k, v, sel.kv_count, idx)
    idx[0, 1, 2, 0] = -1
    with pytest.raises(RuntimeError, match=r"kv_index\[0, 1, 2, 0\] = -1 is out of range \[0, 4\)"):
        attend(q, k, v, sel.kv_count, idx)


def test_kv_index_unsorted():
    q, k, v = qkv()
    count = torch.full((1, 4, 4), 2, dtype=torch.int32)
    index = torch.tensor([0, 1, 0, 0], dtype=torch.int32).expand(1, 4, 4, 4).clone()
    index[0, 3, 1, :2] = torch.tensor([1, 0])
    with pytest.raises(RuntimeError, match=r"kv_index\[0, 3, 1, :kv_count\] must be strictly ascending, but entry 1 \(0\) follows 1"):
        attend(q, k, v, count, index)
    index[0, 3, 1, :2] = torch.tensor([1, 1])  # duplicates are not ascending either
    with pytest.raises(RuntimeError, match=r"must be strictly ascending, but entry 1 \(1\) follows 1"):
        attend(q, k, v, count, index)


@pytest.mark.parametrize("bad", [-1, 5])
def test_kv_count_out_of_range(bad):
    q, k, v = qkv()
    sel = selection(q, k)
    cnt = sel.kv_count.clone()
    cnt[0, 2, 3] = bad
    with pytest.raises(RuntimeError, match=rf"kv_count\[0, 2, 3\] = {bad} is out of range \[0, min\(max_blocks=4, num_k_blocks=4\)\]"):
        attend(q, k, v, cnt, sel.kv_index)


def test_validate_false_skips_the_value_checks():
    """validate=False trusts the selection (the fused op and CUDA graphs use it); a valid
    selection gives the same result either way."""
    q, k, v = qkv()
    sel = selection(q, k)
    a = attend(q, k, v, validate=True)
    b = attend(q, k, v, sel.kv_count, sel.kv_index, validate=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_selection_wrong_dtype():
    q, k, v = qkv()
    sel = selection(q, k)
    with pytest.raises(RuntimeError, match=r"kv_count and kv_index must be int32, got Long and Int"):
        attend(q, k, v, sel.kv_count.long(), sel.kv_index)
    with pytest.raises(RuntimeError, match=r"kv_count and kv_index must be int32, got Int and Long"):
        attend(q, k, v, sel.kv_count, sel.kv_index.long())


def test_selection_wrong_shape():
    q, k, v = qkv()  # B 1, Hq 4, NBq 4
    sel = selection(q, k)
    with pytest.raises(RuntimeError, match=r"kv_count must have shape \[batch, heads_q, ceil\(seqlen_q / block_size\)\] = \[1, 4, 4\], got \[1, 4, 3\]"):
        attend(q, k, v, sel.kv_count[..., :3], sel.kv_index)
    with pytest.raises(RuntimeError, match=r"kv_count must have shape .* got \[4, 4\]"):
        attend(q, k, v, sel.kv_count[0], sel.kv_index)
    with pytest.raises(RuntimeError, match=r"kv_index must have shape \[batch, heads_q, ceil\(seqlen_q / block_size\), max_blocks >= 1\] = \[1, 4, 4, \*\], got \[1, 2, 4, 4\]"):
        attend(q, k, v, sel.kv_count, sel.kv_index[:, :2])
    with pytest.raises(RuntimeError, match=r"kv_index must have shape .* got \[1, 4, 4, 0\]"):
        attend(q, k, v, sel.kv_count, sel.kv_index[..., :0])


def test_kv_index_narrower_than_num_k_blocks():
    """A kv_index narrower than NBk is valid (FlexAttention allows it); counts beyond its
    width are not."""
    q, k, v = qkv()
    sel = selection(q, k)
    narrow = sel.kv_index[..., :3].contiguous()
    cnt = sel.kv_count.clamp(max=3)
    valid = torch.arange(3) < cnt[..., None]
    out, lse = attend(q, k, v, cnt, torch.where(valid, narrow, 0))
    assert torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match=r"is out of range \[0, min\(max_blocks=3, num_k_blocks=4\)\]"):
        attend(q, k, v, sel.kv_count.clamp(min=4), narrow)


# ---------------------------------------------------------------------------------------
# Devices.


@pytest.mark.cuda
def test_different_devices():
    """Needs a second device type; on a CPU-only machine the `cuda` marker skips it (a
    'meta' tensor goes to the fake kernel, which only propagates shapes)."""
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"q and k must be on the same device"):
        select(q.cuda(), k)
    with pytest.raises(RuntimeError, match=r"q and v must be on the same device"):
        fused(q.cuda(), k.cuda(), v)
    # A dtype and block size CUDA supports, so that only the selection's device is wrong.
    sel = flexprefill.select_blocks(q, k, gamma=0.9, tau=0.1, min_budget=0, block_size=64)
    qc, kc, vc = (t.cuda().bfloat16() for t in (q, k, v))
    with pytest.raises(RuntimeError, match=r"kv_count and kv_index must be on q's device"):
        attend(qc, kc, vc, sel.kv_count, sel.kv_index, block_size=64)


@pytest.mark.skipif(bool(flexprefill.supported_head_dims("cuda")), reason="this build has CUDA kernels")
def test_build_without_cuda_reports_it():
    """A build without CUDA lists nothing for 'cuda', and its CUDA kernels (reached here
    by redispatching to the CUDA key, since this machine may have no GPU) refuse with
    the 'built without CUDA' message instead of a dispatcher error."""
    assert flexprefill.supported_head_dims("cuda") == []
    assert flexprefill.supported_block_sizes("cuda") == []
    q, k, v = qkv()
    sel = selection(q, k)
    cuda = DispatchKeySet(DispatchKey.CUDA)
    match = r"flexprefill was built without CUDA support; reinstall with a CUDA toolchain .*FLEXPREFILL_CUDA=1"
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flexprefill.select_blocks.default.redispatch(cuda, q, k, 0.9, 0.1, 0, None, BS, None)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flexprefill.block_sparse_attention.default.redispatch(
            cuda, q, k, v, sel.kv_count, sel.kv_index, BS, None, True)


@pytest.mark.cuda
@pytest.mark.skipif(bool(flexprefill.supported_head_dims("cuda")), reason="this build has CUDA kernels")
def test_cuda_tensors_on_build_without_cuda():
    q, k, v = (t.cuda() for t in qkv())
    with pytest.raises(RuntimeError, match=r"built without CUDA support"):
        fused(q, k, v)
    with pytest.raises(RuntimeError, match=r"built without CUDA support"):
        select(q, k)


def test_unknown_device_type_name():
    with pytest.raises(RuntimeError, match=r"unsupported device type 'tpu'; supported: 'cpu', 'cuda'"):
        torch.ops.flexprefill.supported_head_dims("tpu")


# ---------------------------------------------------------------------------------------
# Empty inputs are valid.


@pytest.mark.parametrize("B,Nq,Nk", [(0, 64, 64), (2, 0, 50), (2, 0, 0), (0, 0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_inputs_give_empty_outputs(B, Nq, Nk, dtype):
    q, k, v = qkv(B=B, Nq=Nq, Nk=Nk, dtype=dtype)
    NBq, NBk = -(-Nq // BS), -(-Nk // BS)
    out, lse, sel = fused(q, k, v, return_lse=True, return_stats=True)
    assert out.shape == (B, Nq, 4, 64) and out.dtype == dtype
    assert lse.shape == (B, 4, Nq) and lse.dtype == torch.float32
    assert sel.kv_count.shape == (B, 4, NBq) and sel.kv_index.shape == (B, 4, NBq, NBk)
    assert sel.query_aware.shape == (B, 4) and not sel.query_aware.any()
    out2, lse2 = attend(q, k, v, sel.kv_count, sel.kv_index)
    assert out2.shape == out.shape and lse2.shape == lse.shape
