"""CUDA block_sparse_attention against dense attention under the expanded block mask
(flexprefill.reference), with FlashAttention's rule from tests/tolerances.py: the
kernel's max error against the oracle is at most twice PyTorch's own error computing in
the input dtype; the LSE within the table's tolerance; rows that see no key give 0 and
-inf."""

from __future__ import annotations

import pytest
import torch

import flexprefill
from flexprefill.reference import cdiv, expand_block_mask
from selection_checks import random_selection as random_selection_any
from tolerances import assert_attention_matches

pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16]
DENSITIES = [0.05, 0.3, 1.0]


def cuda_head_dims() -> list[int]:
    return flexprefill.supported_head_dims("cuda") if torch.cuda.is_available() else [64, 80, 96, 128, 256]


def check_against_reference(q, k, v, kv_count, kv_index, block_size, softmax_scale=None, out=None, lse=None):
    """Runs the kernel (unless out/lse are given) and holds out and lse to the oracle."""
    if out is None:
        out, lse = flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, block_size, softmax_scale)
    Nq, Nk = q.shape[1], k.shape[1]
    assert out.is_contiguous() and lse.shape == (q.shape[0], q.shape[2], Nq)
    # The reference wants kv_index with NBk columns: pad shorter index rows with zeros.
    index = kv_index.cpu()
    index = torch.nn.functional.pad(index, (0, cdiv(Nk, block_size) - index.shape[-1]))
    mask = expand_block_mask(kv_count.cpu(), index, Nq, Nk, block_size)  # [B, Hq, Nq, Nk]
    assert_attention_matches(out.cpu(), lse.cpu(), q.cpu(), k.cpu(), v.cpu(), mask, softmax_scale)
    # A row that sees no key returns exactly 0 (the rule's floor would allow less).
    empty = ~mask.any(-1)  # [B, Hq, Nq]
    assert not out.transpose(1, 2).cpu()[empty].float().abs().sum().item()


def random_qkv(B, Nq, Nk, Hq, Hkv, D, dtype, gen):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    return rnd(B, Nq, Hq, D), rnd(B, Nk, Hkv, D), rnd(B, Nk, Hkv, D)


def random_selection(B, Hq, Nq, Nk, bs, density, keep_sink_diag, gen, max_blocks=None):
    """FlexPrefill-like selection: each causal block kept with probability `density`,
    plus the sink and the diagonal block(s) when `keep_sink_diag`.
    kv_count [B, Hq, NBq] int32, kv_index [B, Hq, NBq, max_blocks or NBk] int32."""
    NBq, NBk, off = cdiv(Nq, bs), cdiv(Nk, bs), Nk - Nq
    r = torch.arange(NBq)
    lo = (off + r * bs) // bs
    hi = (off + torch.clamp((r + 1) * bs, max=Nq) - 1) // bs
    c = torch.arange(NBk)
    causal = c[None, :] <= hi[:, None]  # [NBq, NBk]
    sel = torch.rand(B, Hq, NBq, NBk, generator=gen, device="cuda").cpu() < density
    if keep_sink_diag:
        sel |= (c == 0)[None, None, None, :] | (c[None, :] >= lo[:, None])[None, None]
    sel &= causal[None, None]
    keys = torch.where(sel, c, c + NBk)  # selected first, ascending
    order = torch.sort(keys, dim=-1).values
    kv_index = torch.where(order < NBk, order, torch.zeros_like(order)).to(torch.int32)
    kv_count = sel.sum(-1).to(torch.int32)
    if max_blocks is not None:
        assert int(kv_count.max()) <= max_blocks
        kv_index = kv_index[..., :max_blocks].contiguous()
    return kv_count.cuda(), kv_index.cuda()


@pytest.fixture
def gen():
    g = torch.Generator(device="cuda")
    g.manual_seed(torch.randint(0, 2**31, ()).item())
    return g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", cuda_head_dims())
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("keep_sink_diag", [True, False])
def test_matches_reference(dtype, head_dim, block_size, density, keep_sink_diag, gen):
    B, Nq, Nk, Hq, Hkv = 2, 577, 577, 4, 2
    q, k, v = random_qkv(B, Nq, Nk, Hq, Hkv, head_dim, dtype, gen)
    kv_count, kv_index = random_selection(B, Hq, Nq, Nk, block_size, density, keep_sink_diag, gen)
    check_against_reference(q, k, v, kv_count, kv_index, block_size)


# (B, Nq, Nk, Hq, Hkv): odd lengths, Nq < Nk, GQA ratios 1 / 4 / 8, MQA, batch 3.
SHAPES = [
    (3, 129, 129, 8, 8),
    (1, 1, 1, 4, 1),
    (2, 1, 1000, 4, 4),
    (1, 127, 4097, 8, 1),
    (1, 4097, 4097, 4, 1),
    (1, 1000, 1000, 16, 2),
    (3, 127, 1000, 8, 1),
    (2, 129, 257, 4, 4),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [64, 128])
def test_shapes(shape, dtype, head_dim, block_size, gen):
    B, Nq, Nk, Hq, Hkv = shape
    q, k, v = random_qkv(B, Nq, Nk, Hq, Hkv, head_dim, dtype, gen)
    kv_count, kv_index = random_selection(B, Hq, Nq, Nk, block_size, 0.3, True, gen)
    check_against_reference(q, k, v, kv_count, kv_index, block_size)


@pytest.mark.parametrize("head_dim", cuda_head_dims())
@pytest.mark.parametrize("block_size", [64, 128])
def test_single_and_empty_rows(head_dim, block_size, gen):
    """Rows with zero selected blocks, with one block (any causal one, the diagonal only,
    the last partial block), and rows whose only block is past some of their tokens."""
    B, Nq, Nk, Hq, Hkv = 2, 700, 1001, 4, 2
    bs, off = block_size, Nk - Nq
    q, k, v = random_qkv(B, Nq, Nk, Hq, Hkv, head_dim, torch.bfloat16, gen)
    NBq = cdiv(Nq, bs)
    kv_count, kv_index = random_selection(B, Hq, Nq, Nk, bs, 0.3, False, gen)
    kv_count, kv_index = kv_count.cpu(), kv_index.cpu()
    for b in range(B):
        for h in range(Hq):
            for r in range(NBq):
                hi = (off + min(r * bs + bs, Nq) - 1) // bs
                mode = (b * Hq * NBq + h * NBq + r) % 4
                if mode == 0:
                    kv_count[b, h, r] = 0
                elif mode == 1:
                    kv_count[b, h, r] = 1
                    kv_index[b, h, r, 0] = int(torch.randint(0, hi + 1, (1,), generator=torch.Generator().manual_seed(r)))
                elif mode == 2:
                    kv_count[b, h, r] = 1
                    kv_index[b, h, r, 0] = hi  # diagonal only: early rows of the block may see nothing
    check_against_reference(q, k, v, kv_count.cuda(), kv_index.cuda(), bs)


@pytest.mark.parametrize("block_size", [64, 128])
def test_blocks_past_the_causal_boundary(block_size, gen):
    """Selections that include non-causal key blocks (the kernel masks them, and skips
    the tiles nobody can see) and whole query blocks keeping nothing."""
    B, Nq, Nk, Hq, Hkv, D = 2, 333, 1111, 4, 1, 128
    q, k, v = random_qkv(B, Nq, Nk, Hq, Hkv, D, torch.float16, gen)
    kv_count, kv_index = random_selection_any(B, Hq, Nq, Nk, block_size, p_keep=0.4, p_empty=0.2)
    check_against_reference(q, k, v, kv_count.cuda(), kv_index.cuda(), block_size)


def test_all_rows_empty(gen):
    q, k, v = random_qkv(1, 300, 300, 4, 4, 128, torch.float16, gen)
    kv_count = torch.zeros(1, 4, 3, dtype=torch.int32, device="cuda")
    kv_index = torch.zeros(1, 4, 3, 1, dtype=torch.int32, device="cuda")
    out, lse = flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, 128)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_softmax_scale_and_short_index_rows(gen):
    """A non-default scale, and kv_index with fewer columns than key blocks."""
    B, Nq, Nk, Hq, Hkv, D, bs = 1, 515, 2000, 8, 4, 96 if 96 in cuda_head_dims() else 128, 64
    q, k, v = random_qkv(B, Nq, Nk, Hq, Hkv, D, torch.bfloat16, gen)
    kv_count, kv_index = random_selection(B, Hq, Nq, Nk, bs, 0.05, True, gen)
    m = int(kv_count.max())
    check_against_reference(q, k, v, kv_count, kv_index[..., :m].contiguous(), bs, softmax_scale=0.3)


def test_strided_inputs(gen):
    """Packed qkv (strided batch/seq/head dims), a [B, H, N, D] tensor transposed, and
    strides that are not multiples of 8 elements (copied by the glue)."""
    B, N, H, D, bs = 2, 777, 4, 128, 128
    qkv = torch.randn(B, N, 3, H, D, generator=gen, device="cuda").to(torch.bfloat16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    kv_count, kv_index = random_selection(B, H, N, N, bs, 0.3, True, gen)
    check_against_reference(q, k, v, kv_count, kv_index, bs)

    q2 = torch.randn(B, H, N, D, generator=gen, device="cuda").to(torch.bfloat16).transpose(1, 2)
    check_against_reference(q2, k, v, kv_count, kv_index, bs)

    k3 = torch.randn(B, N, H, D + 3, generator=gen, device="cuda").to(torch.bfloat16)[..., :D]
    assert k3.stride(2) % 8 != 0
    check_against_reference(q, k3, v, kv_count, kv_index, bs)

    # Selection tensors with non-contiguous layouts.
    kv_count_t = kv_count.transpose(1, 2).contiguous().transpose(1, 2)
    kv_index_t = kv_index.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    check_against_reference(q, k, v, kv_count_t, kv_index_t, bs)


def test_deterministic(gen):
    B, N, Hq, Hkv, D, bs = 1, 4097, 4, 2, 128, 128
    q, k, v = random_qkv(B, N, N, Hq, Hkv, D, torch.bfloat16, gen)
    kv_count, kv_index = random_selection(B, Hq, N, N, bs, 0.3, True, gen)
    out1, lse1 = flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, bs)
    out2, lse2 = flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, bs)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    check_against_reference(q, k, v, kv_count, kv_index, bs, out=out1, lse=lse1)


def test_empty_inputs(gen):
    for B, Nq, Nk in [(0, 16, 16), (1, 0, 16), (2, 0, 0)]:
        q, k, v = random_qkv(B, Nq, Nk, 4, 2, 64, torch.bfloat16, gen)
        nbq, nbk = cdiv(Nq, 64), max(cdiv(Nk, 64), 1)
        kv_count = torch.zeros(B, 4, nbq, dtype=torch.int32, device="cuda")
        kv_index = torch.zeros(B, 4, nbq, nbk, dtype=torch.int32, device="cuda")
        out, lse = flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, 64)
        assert out.shape == (B, Nq, 4, 64) and lse.shape == (B, 4, Nq)


def test_validate_errors(gen):
    B, N, Hq, Hkv, D, bs = 1, 600, 4, 2, 64, 128
    q, k, v = random_qkv(B, N, N, Hq, Hkv, D, torch.bfloat16, gen)
    kv_count, kv_index = random_selection(B, Hq, N, N, bs, 1.0, True, gen)
    NBk = cdiv(N, bs)

    bad = kv_count.clone()
    bad[0, 1, 2] = NBk + 3
    with pytest.raises(RuntimeError, match=r"kv_count\[0, 1, 2\] = 8 is out of range"):
        flexprefill.block_sparse_attention(q, k, v, bad, kv_index, bs)
    bad[0, 1, 2] = -1
    with pytest.raises(RuntimeError, match=r"kv_count\[0, 1, 2\] = -1 is out of range"):
        flexprefill.block_sparse_attention(q, k, v, bad, kv_index, bs)

    bad = kv_index.clone()
    bad[0, 3, 4, 1] = NBk
    with pytest.raises(RuntimeError, match=r"kv_index\[0, 3, 4, 1\] = 5 is out of range \[0, 5\)"):
        flexprefill.block_sparse_attention(q, k, v, kv_count, bad, bs)

    bad = kv_index.clone()
    bad[0, 2, 3, 2], bad[0, 2, 3, 3] = 3, 2
    with pytest.raises(RuntimeError, match=r"kv_index\[0, 2, 3, :kv_count\] must be strictly ascending"):
        flexprefill.block_sparse_attention(q, k, v, kv_count, bad, bs)

    bad = kv_index.clone()
    bad[0, 0, 4, 1] = bad[0, 0, 4, 0]  # a repeated block
    with pytest.raises(RuntimeError, match=r"strictly ascending, but entry 1 \(0\) follows 0"):
        flexprefill.block_sparse_attention(q, k, v, kv_count, bad, bs)

    # Offences past kv_count are padding and allowed.
    pad = kv_index.clone()
    pad[0, 0, 0, 1:] = -7
    check_against_reference(q, k, v, kv_count, pad, bs)


def test_cuda_graph_capture(gen):
    """validate=False does no host sync (it captures and replays); validate=True refuses
    capture with a message that says what to do."""
    B, N, Hq, Hkv, D, bs = 1, 1000, 4, 2, 128, 64
    q, k, v = random_qkv(B, N, N, Hq, Hkv, D, torch.bfloat16, gen)
    kv_count, kv_index = random_selection(B, Hq, N, N, bs, 0.3, True, gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, bs, validate=False)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, bs, validate=False)
    q.copy_(torch.randn(q.shape, generator=gen, device="cuda").to(q.dtype))
    graph.replay()
    torch.cuda.synchronize()
    check_against_reference(q, k, v, kv_count, kv_index, bs, out=out.clone(), lse=lse.clone())

    graph2 = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="pass validate=False"):
        with torch.cuda.graph(graph2):
            flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, bs, validate=True)


def test_64bit_offsets(gen):
    """q, k and v of 2^32 elements each (1M tokens x 32 heads x 128): element offsets
    past 2^31 must not wrap. Checks query blocks at the far end against a gathered
    reference."""
    N, H, D, bs = 1 << 20, 32, 128, 128
    assert N * H * D > 2**31
    q = torch.randn(1, N, H, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, N, H, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, N, H, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    NBq = N // bs
    # Sink, one far block and the diagonal per query block.
    r = torch.arange(NBq, device="cuda")
    far = torch.clamp(r // 2, min=1)
    blocks = torch.stack([torch.zeros_like(r), far, r], -1)  # [NBq, 3]
    counts = torch.where(r >= 3, 3, torch.where(r >= 1, 2, 1))
    blocks = torch.where(r[:, None] == 1, torch.tensor([0, 1, 0], device="cuda"), blocks)
    blocks = torch.where(r[:, None] == 2, torch.tensor([0, 1, 2], device="cuda"), blocks)
    kv_index = blocks.to(torch.int32)[None, None].expand(1, H, NBq, 3).contiguous()
    kv_count = counts.to(torch.int32)[None, None].expand(1, H, NBq).contiguous()
    out, lse = flexprefill.block_sparse_attention(q, k, v, kv_count, kv_index, bs, validate=True)
    for h, rb in [(H - 1, NBq - 1), (H - 1, NBq - 2), (17, NBq - 5), (0, 3)]:
        keys = torch.cat([torch.arange(int(c) * bs, int(c) * bs + bs) for c in kv_index[0, h, rb, : int(kv_count[0, h, rb])]])
        rows = torch.arange(rb * bs, rb * bs + bs)
        qs = q[:, rb * bs : rb * bs + bs, h : h + 1]  # [1, bs, 1, D]
        ks, vs = k[:, keys.cuda(), h : h + 1], v[:, keys.cuda(), h : h + 1]
        mask = (keys[None, :] <= rows[:, None])[None, None]  # [1, 1, bs, len(keys)]
        assert_attention_matches(out[:, rb * bs : rb * bs + bs, h : h + 1].cpu(),
                                 lse[:, h : h + 1, rb * bs : rb * bs + bs].cpu(), qs.cpu(), ks.cpu(), vs.cpu(), mask)


def test_supported_head_dims():
    dims = flexprefill.supported_head_dims("cuda")
    assert {64, 128, 256} <= set(dims), dims
    assert flexprefill.supported_block_sizes("cuda") == [64, 128]
    q = torch.randn(1, 16, 2, 48, device="cuda", dtype=torch.bfloat16)
    kv_count = torch.ones(1, 2, 1, dtype=torch.int32, device="cuda")
    kv_index = torch.zeros(1, 2, 1, 1, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="unsupported head_dim 48"):
        flexprefill.block_sparse_attention(q, q, q, kv_count, kv_index, 64)
