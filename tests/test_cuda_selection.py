"""CUDA select_blocks (design.md §1 steps 1-5, 7) against flexprefill.reference.

- the selection (kv_count, kv_index with its zero padding, query_aware) is identical to
  the reference's on random and structured inputs, over batch, Nq < Nk, odd lengths, GQA
  ratios, head dims, dtypes, block sizes, gamma < 1 and = 1, tau = 0, budgets;
- the estimate on its own (row LSE, vertical block mass, slash bin mass) matches the
  reference's fp32 computation within a tolerance (flexprefill._selection_scores);
- the op is capturable in a CUDA graph and deterministic; strided / misaligned inputs,
  empty inputs and bad arguments behave.
"""

from __future__ import annotations

import math

import pytest
import torch

import flexprefill
from flexprefill import reference
from selection_checks import assert_same_selection, assert_well_formed, cdiv
from structured import structured_qkv

pytestmark = pytest.mark.cuda

# (B, Nq, Nk, Hq, Hkv, D, bs, dtype, structured, gamma, tau, min_budget, max_budget)
CASES = [
    (1, 1000, 1000, 8, 2, 64, 64, torch.bfloat16, True, 0.9, 0.1, 128, None),     # GQA 4
    (3, 300, 700, 8, 2, 128, 64, torch.float16, True, 0.9, 0.1, 64, None),       # batch 3, Nq < Nk
    (1, 4097, 4097, 8, 1, 128, 128, torch.bfloat16, True, 0.95, 0.1, 256, None),  # GQA 8, odd length
    (2, 1000, 1500, 4, 4, 256, 128, torch.bfloat16, True, 0.9, 0.2, 256, 1024),  # MHA, D 256, max_budget
    (1, 2048, 2048, 8, 2, 64, 128, torch.float16, True, 1.0, 0.1, 256, None),     # gamma = 1
    (1, 1500, 1500, 8, 2, 96, 64, torch.bfloat16, True, 0.7, 0.0, 0, 128),       # tau = 0, tight budget
    (2, 777, 2000, 8, 4, 80, 64, torch.float16, False, 0.9, 0.1, 64, None),      # Gaussian, D 80
    (1, 3000, 3000, 16, 2, 128, 64, torch.bfloat16, True, 0.8, 0.3, 128, 2048),  # GQA 8, bs 64
    (1, 200, 300, 4, 2, 64, 64, torch.bfloat16, True, 0.9, 0.1, 256, None),      # short: dense
    (1, 129, 129, 2, 1, 64, 64, torch.float16, True, 0.9, 0.1, 0, None),         # just above 2 bs
    # NBq * NBk = 36848 and 97969 > 16384: the query-aware selection runs on several CTAs per head
    (1, 12000, 12500, 4, 4, 128, 64, torch.float16, True, 0.999, 0.5, 64, None),
    (1, 20000, 20000, 4, 4, 64, 64, torch.bfloat16, True, 0.9, 0.5, 256, None),
    # D 64, bs 128: on Hopper the rep kernel also pools Q (heads 0-3 of each batch query-aware),
    # with two heads a CTA and, MHA, one; 133 * 133 > 16384: the multi-CTA selection
    (2, 3000, 3100, 8, 2, 64, 128, torch.bfloat16, True, 0.9, 0.3, 128, None),
    (1, 17000, 17000, 4, 4, 64, 128, torch.float16, True, 0.9, 0.5, 256, None),
    # step 4 beside step 5 by one warp per score array (NBk <= 256, two CTAs of 32 warps):
    # 96 arrays (each warp takes a second one) and NBk = 256 exactly (every lane's 8 items)
    (3, 1200, 1200, 16, 4, 64, 64, torch.bfloat16, True, 0.9, 0.2, 128, None),
    (1, 16384, 16384, 4, 4, 64, 64, torch.bfloat16, True, 0.9, 0.5, 256, None),
]


def make_qk(case, device="cuda"):
    B, Nq, Nk, Hq, Hkv, D, bs, dtype, structured, *_ = case
    if structured:
        q, k, _ = structured_qkv(B, Nq, Nk, Hq, Hkv, D, dtype=dtype, topic_len=2 * bs)
    else:
        q = torch.randn(B, Nq, Hq, D).to(dtype)
        k = torch.randn(B, Nk, Hkv, D).to(dtype)
    return q.to(device), k.to(device)


def case_args(case) -> dict:
    *_, bs, dtype, structured, gamma, tau, min_budget, max_budget = case
    return dict(gamma=gamma, tau=tau, min_budget=min_budget, max_budget=max_budget, block_size=bs)


def explain(q, k, got, want, args) -> str:
    """Per differing head: the reference's JSD distance and the kernel's estimate error."""
    lines = []
    diff = (got.kv_count.cpu() != want.kv_count).any(-1) | (got.query_aware.cpu() != want.query_aware)
    bs = args["block_size"]
    if q.shape[1] >= bs:
        lse, vert, slash, qa = torch.ops.flexprefill._selection_scores(q, k, bs, None, args["tau"])
    for b, h in diff.nonzero().tolist()[:4]:
        msg = f"(b={b}, h={h}) query_aware got {bool(got.query_aware[b, h])} want {bool(want.query_aware[b, h])}"
        if q.shape[1] >= bs:
            hk = h // (q.shape[2] // k.shape[2])
            rv, rs, _ = reference_scores(q[b, :, h].cpu(), k[b, :, hk].cpu(), bs, 1 / math.sqrt(q.shape[3]))
            msg += f"; |vert - ref| {(vert[b, h].cpu() - rv).abs().max():.2e}, |slash - ref| {(slash[b, h].cpu() - rs).abs().max():.2e}"
        lines.append(msg)
    return "\n".join(lines)


def reference_scores(q, k, bs, scale):
    """fp32 row LSE [m], vertical block mass [NBk], slash bin mass [NBk] of one head (the
    reference's steps 1-2; bin t = distances [t bs, t bs + bs))."""
    q, k = q.float(), k.float()
    Nq, Nk = q.shape[0], k.shape[0]
    m = min(bs, Nq)
    pos = Nk - m + torch.arange(m)
    keys = torch.arange(Nk)
    logits = (scale * (q[Nq - m:] @ k.T)).masked_fill(keys[None, :] > pos[:, None], float("-inf"))
    lse = torch.logsumexp(logits, -1)
    A = torch.softmax(logits, -1)
    NBk = cdiv(Nk, bs)
    vert = torch.zeros(NBk).index_add_(0, keys // bs, A.mean(0))
    delta = pos[:, None] - keys[None, :]
    valid = delta >= 0
    slash = torch.zeros(Nk).index_add_(0, delta[valid], A[valid]) / m
    bins = torch.zeros(NBk).index_add_(0, keys // bs, slash)
    return vert, bins, lse


def _cut_margin(scores: torch.Tensor, gamma, n_min: int, n_max: int, n_cap: int) -> float:
    """Relative distance of a "fewest reaching gamma, within budgets" decision from a tie:
    the running mass at the cut against gamma, and the gap between the last kept and the
    first dropped score."""
    vals = torch.sort(scores.flatten(), descending=True).values
    margin = math.inf
    if gamma is not None:
        csum = torch.cumsum(vals.double(), 0).float()
        reached = torch.nonzero(csum >= gamma)
        kg = int(reached[0, 0]) + 1 if reached.numel() else vals.numel()
        for i in (kg - 1, kg - 2):
            if 0 <= i < vals.numel():
                margin = min(margin, abs(float(csum[i]) - gamma) / gamma)
        n = max(n_min, min(kg, n_max, n_cap))
    else:
        n = n_min
    if 0 < n < vals.numel() and float(vals[n - 1]) > 0:
        margin = min(margin, float(vals[n - 1] - vals[n]) / float(vals[n - 1]))
    return margin


def head_margin(q, k, *, gamma, tau, min_budget, max_budget, block_size) -> float:
    """The smallest relative margin of any decision the reference takes for one head
    (step 3's d < tau, the gamma cuts of steps 4-5, the ordering at every cut). Below
    ~1e-4 the decision is within fp32 noise (the reference's own included): a tie."""
    bs, scale = block_size, 1 / math.sqrt(q.shape[-1])
    q, k = q.float(), k.float()
    Nq, Nk = q.shape[0], k.shape[0]
    NBq, NBk = cdiv(Nq, bs), cdiv(Nk, bs)
    vert, bins, _ = reference_scores(q, k, bs, scale)
    pool_k = reference._pool(k, bs)
    est = torch.softmax(scale * (pool_k @ q[Nq - min(bs, Nq):].mean(0)), 0)
    pe, pt = est.clamp_min(reference.JSD_EPS), vert.clamp_min(reference.JSD_EPS)
    mid = 0.5 * (pe + pt)
    d = math.sqrt(max(float(0.5 * (pe * (pe / mid).log()).sum() + 0.5 * (pt * (pt / mid).log()).sum()), 0.0))
    margin = abs(d - tau) / tau if tau > 0 else math.inf
    n_min = min(cdiv(min_budget, bs), NBk)
    n_max = NBk if max_budget is None else min(cdiv(max_budget, bs), NBk)
    qa = d < tau
    if gamma >= 1.0:  # every causal block whatever the scores: only d < tau can tie
        return margin
    for scores in (vert, bins):
        margin = min(margin, _cut_margin(scores, None if qa else gamma, n_min, n_max, NBk))
    if qa:
        off = Nk - Nq
        hi = torch.tensor([off + min(r * bs + bs, Nq) - 1 for r in range(NBq)])
        allowed = torch.arange(NBk)[None, :] <= (hi // bs)[:, None]
        logits = (scale * (reference._pool(q, bs) @ pool_k.T)).masked_fill(~allowed, float("-inf"))
        est_qa = torch.softmax(logits, -1) / NBq
        margin = min(margin, _cut_margin(est_qa, gamma, 0, est_qa.numel(), int(allowed.sum())))
    return margin


TIE_MARGIN = 1e-4


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_select_blocks_matches_reference(case):
    """Identical to the reference on every head whose decisions are not ties within fp32
    noise (relative margin >= 1e-4); such near-ties are reported and must stay rare."""
    check_against_reference(case)


def check_against_reference(case):
    """select_blocks on the GPU vs the reference for one case (near-ties allowed); returns q, k."""
    B, Nq, Nk, Hq, Hkv, D, bs, *_ = case
    q, k = make_qk(case)
    args = case_args(case)
    got = flexprefill.select_blocks(q, k, **args)
    torch.cuda.synchronize()
    want = reference.select_blocks(q.cpu(), k.cpu(), **args)
    assert got.kv_count.device == q.device and got.kv_index.device == q.device
    assert_well_formed(got, Nq, Nk, bs)
    differs = ((got.kv_count.cpu() != want.kv_count).any(-1) | (got.kv_index.cpu() != want.kv_index).flatten(2).any(-1)
               | (got.query_aware.cpu() != want.query_aware))
    ties = []
    for b, h in differs.nonzero().tolist():
        margin = head_margin(q[b, :, h].cpu(), k[b, :, h // (Hq // Hkv)].cpu(), **args)
        if margin >= TIE_MARGIN:
            raise AssertionError(f"head (b={b}, h={h}) differs from the reference with decision margin "
                                 f"{margin:.2e}\n{explain(q, k, got, want, args)}")
        ties.append((b, h, margin))
    if ties:
        print(f"near-ties (accepted): {ties}")
    assert len(ties) <= max(1, B * Hq // 8), f"too many near-tie heads: {ties}"
    return q, k


@pytest.mark.parametrize("split", [1024, 2048, 8192])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[6], CASES[12], CASES[13]],
                         ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_long_rep_splits(monkeypatch, case, split):
    """The plan shortens the rep kernel's key splits until its CTAs fill the GPU, so inputs of
    test size only ever run 256-key splits; long prompts run 1024- and 2048-key ones.
    FLEXPREFILL_TEST_REP_SPLIT forces them (8192: one split for every key here): the scores
    match fp32 and the selection matches the reference as at the default split. Head dims
    64, 128, 256 (the wgmma kernel on Hopper) and 80 (the mma.sync kernel everywhere)."""
    monkeypatch.setenv("FLEXPREFILL_TEST_REP_SPLIT", str(split))
    q, k = check_against_reference(case)
    B, Nq, Nk, Hq, Hkv, D, bs, *_ = case
    lse, vert, slash, _ = torch.ops.flexprefill._selection_scores(q, k, bs, None, 0.1)
    for b, h in [(0, 0), (B - 1, Hq - 1)]:
        rv, rs, rl = reference_scores(q[b, :, h].cpu(), k[b, :, h // (Hq // Hkv)].cpu(), bs, 1 / math.sqrt(D))
        torch.testing.assert_close(lse[b, h].cpu(), rl, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vert[b, h].cpu(), rv, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(slash[b, h].cpu(), rs, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("n", [3000, 9000])
def test_query_aware_exact_ties(n):
    """Every key equal: pool(K) rows are identical, so each query block's estimate is
    uniform (exact ties in the kernel and in the reference alike) and the gamma cut falls
    inside a tie group, which must be broken by index like the reference's stable sort.
    9000 tokens at bs 64 give 141 * 141 > 16384 estimate entries: the multi-CTA selection,
    whose chunks rank their ties after the earlier chunks'."""
    torch.manual_seed(n)
    q = torch.randn(1, n, 2, 64).to(torch.bfloat16)
    k = torch.randn(1, 1, 1, 64).to(torch.bfloat16).expand(1, n, 1, 64).contiguous()
    args = dict(gamma=0.9, tau=0.1, min_budget=0, max_budget=None, block_size=64)
    got = flexprefill.select_blocks(q.cuda(), k.cuda(), **args)
    want = reference.select_blocks(q, k, **args)
    assert bool(want.query_aware.all()), "uniform attention should make every head query-aware"
    assert_same_selection(got, want, "cuda vs reference (exact ties)")


@pytest.mark.parametrize("n", [3000, 9000])
@pytest.mark.parametrize("heads_per_wave", [1, 3])
def test_query_aware_several_waves(monkeypatch, n, heads_per_wave):
    """Long prompts run the query-aware step in waves of heads (its scratch is capped);
    FLEXPREFILL_TEST_QA_WAVE_BYTES shrinks the cap so that short inputs do too. Each wave's
    kernels serve its query-aware heads by rank, so the waves see different mixes of
    query-aware and vertical-slash heads; the selection must equal the one-wave run bit for
    bit (one CTA per head at 3000 tokens, the multi-CTA radix selection at 9000)."""
    # tau 0.3: heads 0-3 of each batch are query-aware, 4-7 vertical-slash
    case = (2, n, n, 8, 2, 64, 64, torch.bfloat16, True, 0.9, 0.3, 64, None)
    q, k = make_qk(case)
    args = case_args(case)
    one = flexprefill.select_blocks(q, k, **args)
    n_qa = int(one.query_aware.sum())
    assert 0 < n_qa < one.query_aware.numel(), (
        f"the input should mix query-aware and vertical-slash heads: {one.query_aware.int().tolist()}")
    nb = cdiv(n, 64)
    per_head = 4 * nb * (nb + 64) + (64 + 3 * 2048 * 4)  # select_plan.h: estimate + pool(Q) + radix state
    monkeypatch.setenv("FLEXPREFILL_TEST_QA_WAVE_BYTES", str(heads_per_wave * per_head))
    waves = flexprefill.select_blocks(q, k, **args)
    torch.cuda.synchronize()
    for name in ("kv_count", "kv_index", "query_aware"):
        assert torch.equal(getattr(waves, name), getattr(one, name)), (
            f"{name} differs with {heads_per_wave} heads a wave")


@pytest.mark.parametrize("name,value,message", [
    ("FLEXPREFILL_TEST_REP_SPLIT", "300", "FLEXPREFILL_TEST_REP_SPLIT must be a positive multiple of 256 keys"),
    ("FLEXPREFILL_TEST_REP_SPLIT", "0", "FLEXPREFILL_TEST_REP_SPLIT must be a positive multiple of 256 keys"),
    ("FLEXPREFILL_TEST_REP_SPLIT", str(1 << 25), r"\(at most 16777216\), got '33554432'"),
    ("FLEXPREFILL_TEST_QA_WAVE_BYTES", "lots", "FLEXPREFILL_TEST_QA_WAVE_BYTES must be a positive byte count"),
    ("FLEXPREFILL_TEST_QA_WAVE_BYTES", "-5", "FLEXPREFILL_TEST_QA_WAVE_BYTES must be a positive byte count"),
])
def test_testing_hooks_reject_bad_values(monkeypatch, name, value, message):
    """The testing hooks (unset in normal use) say what they take instead of running with a
    value they cannot honour."""
    q, k = make_qk(CASES[0])
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=message):
        flexprefill.select_blocks(q, k, **case_args(CASES[0]))


def test_query_aware_gamma_near_one():
    """gamma within float rounding of 1 on the multi-CTA path (141 * 141 > 16384 entries):
    the estimate's mass may never reach float(gamma) = 1, and then the query-aware heads take
    the top n_allowed blocks by count (qa_mark on one CTA); either way, as the reference."""
    torch.manual_seed(11)
    n = 9000
    q = torch.randn(1, n, 4, 64).to(torch.bfloat16)
    k = torch.randn(1, n, 2, 64).to(torch.bfloat16)
    args = dict(gamma=1 - 1e-9, tau=0.5, min_budget=0, max_budget=None, block_size=64)
    got = flexprefill.select_blocks(q.cuda(), k.cuda(), **args)
    want = reference.select_blocks(q, k, **args)
    assert bool(want.query_aware.any()), "Gaussian inputs at tau 0.5 should give query-aware heads"
    assert_same_selection(got, want, "cuda vs reference (gamma near 1)")


def test_both_patterns_occur():
    """Structured inputs give query-aware AND vertical-slash heads, and the kernel agrees."""
    case = (1, 2048, 2048, 16, 4, 128, 128, torch.bfloat16, True, 0.9, 0.1, 256, None)
    q, k = make_qk(case)
    args = case_args(case)
    got = flexprefill.select_blocks(q, k, **args)
    want = reference.select_blocks(q.cpu(), k.cpu(), **args)
    assert_same_selection(got, want, "cuda vs reference")
    qa = got.query_aware.cpu()
    assert qa.any() and (~qa).any(), f"expected both patterns, query_aware = {qa.tolist()}"
    density = got.density(2048, 2048, 128)
    assert (density < 1).any(), "structured inputs should give a sparse selection"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs,Nq,Nk,D", [(64, 1000, 1000, 64), (128, 700, 1800, 128), (128, 300, 4100, 256)])
def test_scores_match_fp32(dtype, bs, Nq, Nk, D):
    """Steps 1-2 on tensor cores against the reference's fp32 arithmetic on the same
    (rounded) inputs: row LSE, vertical block mass and slash bin mass."""
    B, Hq, Hkv = 2, 4, 2
    q, k, _ = structured_qkv(B, Nq, Nk, Hq, Hkv, D, dtype=dtype, topic_len=2 * bs)
    q, k = q.cuda(), k.cuda()
    lse, vert, slash, _ = torch.ops.flexprefill._selection_scores(q, k, bs, None, 0.1)
    for b in range(B):
        for h in range(Hq):
            rv, rs, rl = reference_scores(q[b, :, h].cpu(), k[b, :, h // 2].cpu(), bs, 1 / math.sqrt(D))
            torch.testing.assert_close(lse[b, h].cpu(), rl, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(vert[b, h].cpu(), rv, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(slash[b, h].cpu(), rs, rtol=1e-4, atol=1e-7)
            assert abs(float(vert[b, h].sum()) - 1) < 1e-4 and abs(float(slash[b, h].sum()) - 1) < 1e-4


def test_cuda_graph_and_determinism():
    """Capture once, replay on new inputs copied into the same buffers: same as eager."""
    case = (2, 1500, 2000, 8, 2, 128, 128, torch.bfloat16, True, 0.9, 0.1, 256, None)
    args = case_args(case)
    q0, k0 = make_qk(case)
    q_buf, k_buf = q0.clone(), k0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (allocator, attributes) off the capture
        flexprefill.select_blocks(q_buf, k_buf, **args)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = flexprefill.select_blocks(q_buf, k_buf, **args)
    for trial in range(3):
        q, k = make_qk(case)
        q_buf.copy_(q)
        k_buf.copy_(k)
        graph.replay()
        torch.cuda.synchronize()
        eager = flexprefill.select_blocks(q, k, **args)
        assert_same_selection(static, eager, f"graph replay {trial} vs eager")
        again = flexprefill.select_blocks(q, k, **args)
        assert_same_selection(again, eager, "eager run twice")


@pytest.mark.parametrize("case", [
    (1, 2048, 2048, 16, 4, 128, 128, torch.bfloat16, True, 0.9, 0.1, 256, None),  # NBk 16: select_warps_kernel
    (1, 16448, 16448, 16, 4, 64, 64, torch.bfloat16, True, 0.9, 0.1, 256, None),  # NBk 257: side stream
], ids=["step4-after-estimate", "step4-side-stream"])
def test_busy_user_stream(case):
    """Step 4 runs beside step 5: up to 256 key blocks on the caller's stream after the first
    estimate (programmatic dependent launch), beyond on a side stream forked from the caller's
    stream and joined back. Called on a user stream that is still busy (a long sleep queued
    before the inputs are written), every kernel must wait for that stream: the result equals
    an idle-stream call."""
    args = case_args(case)
    q, k = make_qk(case)
    want = flexprefill.select_blocks(q, k, **args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q2, k2 = torch.zeros_like(q), torch.zeros_like(k)
        torch.cuda._sleep(50_000_000)  # tens of milliseconds before the inputs are written
        q2.copy_(q)
        k2.copy_(k)
        got = flexprefill.select_blocks(q2, k2, **args)
        got_cpu = [t.cpu() for t in (got.kv_count, got.kv_index, got.query_aware)]  # ordered on s
    torch.cuda.synchronize()
    assert bool(want.query_aware.any()) and not bool(want.query_aware.all()), "want both patterns"
    for name, a in zip(("kv_count", "kv_index", "query_aware"), got_cpu):
        assert torch.equal(a, getattr(want, name).cpu()), f"busy stream: {name} differs"


def test_strided_and_misaligned_inputs():
    """q, k as views of packed projections (row stride > H D) and at an odd element offset
    (not 16-byte aligned: the op copies them) give the contiguous result."""
    case = (2, 1100, 1300, 8, 2, 64, 64, torch.float16, True, 0.9, 0.1, 128, None)
    args = case_args(case)
    q, k = make_qk(case)
    want = flexprefill.select_blocks(q, k, **args)
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    packed = torch.randn(B, Nk, Hq + 2 * Hkv, D, device="cuda", dtype=q.dtype)
    packed[:, Nk - Nq:, :Hq] = q
    packed[:, :, Hq:Hq + Hkv] = k
    got = flexprefill.select_blocks(packed[:, Nk - Nq:, :Hq], packed[:, :, Hq:Hq + Hkv], **args)
    assert_same_selection(got, want, "packed views")
    odd_q = torch.randn(B, Nq, Hq, D + 1, device="cuda", dtype=q.dtype)[..., 1:]
    odd_k = torch.randn(B, Nk, Hkv, D + 1, device="cuda", dtype=q.dtype)[..., 1:]
    odd_q.copy_(q)
    odd_k.copy_(k)
    got = flexprefill.select_blocks(odd_q, odd_k, **args)
    assert_same_selection(got, want, "misaligned views")


def test_empty_inputs():
    q = torch.randn(0, 500, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(0, 500, 2, 64, device="cuda", dtype=torch.bfloat16)
    sel = flexprefill.select_blocks(q, k, block_size=64)
    assert sel.kv_count.shape == (0, 4, 8) and sel.kv_index.shape == (0, 4, 8, 8) and sel.query_aware.shape == (0, 4)
    q = torch.randn(2, 0, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 300, 2, 64, device="cuda", dtype=torch.bfloat16)
    sel = flexprefill.select_blocks(q, k, block_size=64)
    assert sel.kv_count.shape == (2, 4, 0) and sel.kv_index.shape == (2, 4, 0, 5)
    assert not sel.query_aware.cpu().any()


def test_bad_inputs_raise():
    q = torch.randn(1, 600, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 600, 2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="block_size"):
        flexprefill.select_blocks(q, k, block_size=48)
    with pytest.raises(RuntimeError, match="dtype"):
        flexprefill.select_blocks(q.float(), k.float(), block_size=64)
    with pytest.raises(RuntimeError, match="gamma"):
        flexprefill.select_blocks(q, k, gamma=0.0, block_size=64)
    with pytest.raises(RuntimeError, match="head_dim"):
        flexprefill.select_blocks(q[..., :40], k[..., :40], block_size=64)
    with pytest.raises(RuntimeError, match="device"):
        flexprefill.select_blocks(q, k.cpu(), block_size=64)
    with pytest.raises(RuntimeError, match="seqlen_q"):
        flexprefill.select_blocks(q, k[:, :100], block_size=64)
    # 2^31 keys (a stride-0 view: no memory): positions no longer fit the kernels' int32
    k_long = torch.zeros(1, 1, 2, 64, device="cuda", dtype=torch.bfloat16).expand(1, 2**31, 2, 64)
    with pytest.raises(RuntimeError, match="too long"):
        flexprefill.select_blocks(q, k_long, block_size=64)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (tensors on a non-current device)")
def test_non_current_device():
    case = (1, 900, 900, 4, 2, 64, 64, torch.bfloat16, True, 0.9, 0.1, 64, None)
    q, k = make_qk(case, device="cuda:1")
    args = case_args(case)
    with torch.cuda.device(0):
        got = flexprefill.select_blocks(q, k, **args)
    assert got.kv_index.device == q.device
    assert_same_selection(got, reference.select_blocks(q.cpu(), k.cpu(), **args), "cuda:1 vs reference")
