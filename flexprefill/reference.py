"""Pure-PyTorch reference of FlexPrefill (Lai et al., ICLR 2025, arXiv 2502.20766).

This module is the test oracle of the project, not a production path: it is written to
be read next to the paper, loops over batch and heads in Python, and computes in fp32.
The C++ (CPU) and CUDA operators must return the same block selection on inputs
without ties, and the same attention output within floating-point error.

Notation (design.md §1)::

    q        [B, Nq, Hq, D]   queries: the LAST Nq positions of the sequence
    k, v     [B, Nk, Hkv, D]  keys / values, Nq <= Nk
    bs                        block size (tokens)
    s                         softmax scale (default 1/sqrt(D))
    off = Nk - Nq             absolute position of query row i is off + i
    NBq = ceil(Nq / bs)       query blocks start at query row 0 (FlexAttention's layout)
    NBk = ceil(Nk / bs)       key blocks start at key 0

Query block r holds the rows [r*bs, min(r*bs+bs, Nq)), at absolute positions
[lo_r, hi_r] = [off + r*bs, off + min(r*bs+bs, Nq) - 1]. It may see key blocks
c <= hi_r // bs (causal blocks); the blocks c in [lo_r // bs, hi_r // bs] hold its
token-level causal boundary (diagonal blocks; two of them when off % bs != 0).

Selection format (PyTorch FlexAttention's BlockMask)::

    kv_count     [B, Hq, NBq]       int32  number of selected key blocks
    kv_index     [B, Hq, NBq, NBk]  int32  their indices ascending, then 0-padded
    query_aware  [B, Hq]            bool   head chose the query-aware pattern

Ties: every "fewest items whose mass reaches gamma" rule sorts by score descending and
breaks ties by the lower index (a stable sort), so all implementations agree.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

# Probabilities are clamped to this before the JSD (step 3) so that log(0) never
# makes the distance NaN.
JSD_EPS = 1e-12


class Selection(NamedTuple):
    kv_count: torch.Tensor  # [B, Hq, NBq] int32
    kv_index: torch.Tensor  # [B, Hq, NBq, NBk] int32
    query_aware: torch.Tensor  # [B, Hq] bool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dense_threshold(block_size: int, min_budget: int) -> int:
    """Step 7: a chunk of at most this many queries is answered densely."""
    return max(2 * block_size, min_budget)


def _fewest_reaching(scores: torch.Tensor, gamma: float) -> tuple[torch.Tensor, int]:
    """Order of `scores` (1-D) by descending score, ties by lower index, and the fewest
    leading items whose summed score reaches `gamma` (all items if the sum never does)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    csum = torch.cumsum(scores[order], 0)
    reached = torch.nonzero(csum >= gamma)
    k = int(reached[0, 0]) + 1 if reached.numel() else scores.numel()
    return order, k


def _block_rows(r: int, Nq: int, off: int, bs: int) -> tuple[int, int]:
    """Absolute positions [lo_r, hi_r] of the rows of query block r."""
    return off + r * bs, off + min(r * bs + bs, Nq) - 1


def _pool(x: torch.Tensor, bs: int) -> torch.Tensor:
    """Mean of each block of `bs` rows of x [N, D] (the last block over its valid rows)."""
    N, D = x.shape
    nb = cdiv(N, bs)
    pad = nb * bs - N
    xp = torch.cat([x, x.new_zeros(pad, D)]) if pad else x
    counts = torch.full((nb,), float(bs), dtype=x.dtype, device=x.device)
    counts[-1] = bs - pad
    return xp.view(nb, bs, D).sum(1) / counts[:, None]


def select_head(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    gamma: float,
    tau: float,
    min_budget: int,
    max_budget: Optional[int],
    block_size: int,
    softmax_scale: float,
) -> tuple[list[torch.Tensor], bool]:
    """Selection for one query head. q [Nq, D], k [Nk, D] (any float dtype).

    Returns, per query block r, the sorted int64 tensor of selected key blocks, and
    whether the head is query-aware. Assumes Nq > dense_threshold (the caller decides).
    """
    bs, s = block_size, softmax_scale
    Nq, Nk = q.shape[0], k.shape[0]
    off = Nk - Nq
    NBq, NBk = cdiv(Nq, bs), cdiv(Nk, bs)
    q, k = q.float(), k.float()

    # Step 1: representative queries Q̂ = the last min(bs, Nq) rows; their exact causal
    # attention over all keys, A = softmax(s Q̂ Kᵀ) in fp32 (paper Alg. 2, line 1).
    m = min(bs, Nq)
    q_hat = q[Nq - m:]  # [m, D]
    pos = off + Nq - m + torch.arange(m)  # absolute positions of the rows  [m]
    keys = torch.arange(Nk)
    logits = s * (q_hat @ k.T)  # [m, Nk]
    logits = logits.masked_fill(keys[None, :] > pos[:, None], float("-inf"))
    A = torch.softmax(logits, dim=-1)

    # Step 2: vertical score of key j = mean over rows of A[:, j]; slash score of
    # distance δ = mean over rows of A[i, pos_i - δ] (paper Alg. 3, the two sums).
    vertical = A.mean(0)  # [Nk]
    delta = pos[:, None] - keys[None, :]  # [m, Nk]
    valid = delta >= 0
    slash = torch.zeros(Nk).index_add_(0, delta[valid], A[valid]) / m  # [Nk]

    # Step 3: pattern decision. Estimated block distribution ā = softmax(s mean(Q̂)
    # pool(K)ᵀ) against the true pooled one â (vertical scores summed per key block);
    # d = sqrt(JSD(ā ‖ â)) with natural logs (paper Eq. 4-5).
    pool_k = _pool(k, bs)  # [NBk, D]
    est = torch.softmax(s * (pool_k @ q_hat.mean(0)), dim=0)  # ā  [NBk]
    true = torch.zeros(NBk).index_add_(0, keys // bs, vertical)  # â  [NBk]
    p_est, p_true = est.clamp_min(JSD_EPS), true.clamp_min(JSD_EPS)
    mid = 0.5 * (p_est + p_true)
    jsd = 0.5 * (p_est * (p_est / mid).log()).sum() + 0.5 * (p_true * (p_true / mid).log()).sum()
    query_aware = math.sqrt(max(float(jsd), 0.0)) < tau

    # Step 4: vertical-slash selection (paper Alg. 3), at block granularity so that γ
    # is really covered and the budgets count blocks: the vertical score of key-block
    # column c is â[c]; the slash score of distance bin t (distances [t*bs, t*bs+bs))
    # is the slash mass of its lines. Keep the fewest columns, and separately the fewest
    # bins, reaching γ; budgets are tokens, converted to ceil(tokens / bs) blocks.
    slash_bins = torch.zeros(NBk).index_add_(0, keys // bs, slash)  # [NBk]
    min_blocks = min(cdiv(min_budget, bs), NBk)
    max_blocks = NBk if max_budget is None else min(cdiv(max_budget, bs), NBk)

    def keep_fewest(scores: torch.Tensor, g: Optional[float]) -> torch.Tensor:
        """[NBk] bool: the fewest items reaching g, within the budgets. g=None keeps only
        the min-budget items (what query-aware heads add)."""
        order, kg = _fewest_reaching(scores, 0.0 if g is None else g)
        n = min_blocks if g is None else max(min_blocks, min(kg, max_blocks))
        chosen = torch.zeros(NBk, dtype=torch.bool)
        chosen[order[:n]] = True
        return chosen

    def vertical_slash(g: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected key-block columns [NBk] bool and slash lines (distances) [Nk] bool."""
        return keep_fewest(true, g), keep_fewest(slash_bins, g)[keys // bs]

    # Step 5: query-aware estimate for every query block, Â = softmax(s pool(Q) pool(K)ᵀ)
    # under the block-causal mask, row-wise, then flattened and normalised over the
    # head (each query block carries 1/NBq); keep the fewest blocks reaching γ (Alg. 2).
    qa_blocks = torch.zeros(NBq, NBk, dtype=torch.bool)
    if query_aware:
        pool_q = _pool(q, bs)  # [NBq, D]
        hi = torch.tensor([_block_rows(r, Nq, off, bs)[1] for r in range(NBq)])
        allowed = torch.arange(NBk)[None, :] <= (hi // bs)[:, None]  # [NBq, NBk]
        est_qa = s * (pool_q @ pool_k.T)
        est_qa = torch.softmax(est_qa.masked_fill(~allowed, float("-inf")), dim=-1) / NBq
        order, kg = _fewest_reaching(est_qa.flatten(), gamma)
        kg = min(kg, int(allowed.sum()))
        qa_blocks.view(-1)[order[:kg]] = True
        cols, lines = vertical_slash(None)  # union with the min-budget VS blocks
    else:
        cols, lines = vertical_slash(gamma)

    # Slash lines are covered for every row they touch: query block r needs key block c
    # iff some selected δ lies in [lo_r - c*bs - bs + 1, hi_r - c*bs].
    line_prefix = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lines.long(), 0)])

    def lines_in(a: int, b: int) -> int:
        a, b = max(a, 0), min(b, Nk - 1)
        return int(line_prefix[b + 1] - line_prefix[a]) if a <= b else 0

    result = []
    for r in range(NBq):
        lo, hi = _block_rows(r, Nq, off, bs)
        chosen = []
        for c in range(hi // bs + 1):  # causal blocks only
            keep = (
                c == 0  # sink
                or c >= lo // bs  # diagonal
                or bool(cols[c])
                or lines_in(lo - c * bs - bs + 1, hi - c * bs) > 0
                or bool(qa_blocks[r, c])
            )
            if keep:
                chosen.append(c)
        if gamma >= 1.0:  # γ = 1 keeps all the attention: every causal block
            chosen = list(range(hi // bs + 1))
        result.append(torch.tensor(chosen, dtype=torch.long))
    return result, query_aware


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    gamma: float = 0.9,
    tau: float = 0.1,
    min_budget: int = 1024,
    max_budget: Optional[int] = None,
    block_size: int = 128,
    softmax_scale: Optional[float] = None,
) -> Selection:
    """Reference of `flexprefill.select_blocks`. q [B, Nq, Hq, D], k [B, Nk, Hkv, D]."""
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    bs = block_size
    s = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    NBq, NBk, off = cdiv(Nq, bs), cdiv(Nk, bs), Nk - Nq
    kv_count = torch.zeros(B, Hq, NBq, dtype=torch.int32)
    kv_index = torch.zeros(B, Hq, NBq, NBk, dtype=torch.int32)
    query_aware = torch.zeros(B, Hq, dtype=torch.bool)
    dense = Nq <= dense_threshold(bs, min_budget)
    for b in range(B):
        for h in range(Hq):
            if dense:  # step 7: short inputs are answered by dense causal attention
                blocks = [torch.arange(_block_rows(r, Nq, off, bs)[1] // bs + 1) for r in range(NBq)]
            else:
                blocks, qa = select_head(
                    q[b, :, h].cpu(), k[b, :, h // (Hq // Hkv)].cpu(),
                    gamma=gamma, tau=tau, min_budget=min_budget, max_budget=max_budget,
                    block_size=bs, softmax_scale=s,
                )
                query_aware[b, h] = qa
            for r, sel in enumerate(blocks):
                kv_count[b, h, r] = sel.numel()
                kv_index[b, h, r, : sel.numel()] = sel.to(torch.int32)
    return Selection(kv_count, kv_index, query_aware)


def expand_block_mask(
    kv_count: torch.Tensor, kv_index: torch.Tensor, Nq: int, Nk: int, block_size: int
) -> torch.Tensor:
    """Token-level mask [B, Hq, Nq, Nk] bool of a selection, causal (bottom-right) included."""
    B, Hq, NBq, NBk = kv_index.shape
    bs, off = block_size, Nk - Nq
    valid = torch.arange(NBk)[None, None, None, :] < kv_count[..., None].long().cpu()
    idx = torch.where(valid, kv_index.long().cpu(), torch.zeros((), dtype=torch.long))
    hits = torch.zeros(B, Hq, NBq, NBk, dtype=torch.long).scatter_add_(-1, idx, valid.long())
    blocks = hits > 0  # [B, Hq, NBq, NBk]
    mask = blocks.repeat_interleave(bs, 2)[:, :, :Nq].repeat_interleave(bs, 3)[..., :Nk]
    causal = torch.arange(Nk)[None, :] <= (off + torch.arange(Nq))[:, None]
    return mask & causal


def attention_with_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
    softmax_scale: Optional[float] = None, dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, Nq, Hq, D] over k, v [B, Nk, Hkv, D] under mask [B, Hq, Nq, Nk],
    computed in `dtype`. Rows with no visible key give output 0 and LSE -inf.
    Returns out [B, Nq, Hq, D] (in `dtype`) and lse [B, Hq, Nq] fp32 (natural log)."""
    B, Nq, Hq, D = q.shape
    Hkv = k.shape[2]
    s = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qh = q.to(dtype).transpose(1, 2)  # [B, Hq, Nq, D]
    kh = k.to(dtype).transpose(1, 2).repeat_interleave(Hq // Hkv, 1)  # [B, Hq, Nk, D]
    vh = v.to(dtype).transpose(1, 2).repeat_interleave(Hq // Hkv, 1)
    logits = (qh @ kh.transpose(-1, -2)).float() * s
    logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
    lse = torch.logsumexp(logits, -1)  # [B, Hq, Nq]
    probs = torch.exp(logits - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = (probs.to(dtype) @ vh).transpose(1, 2)  # [B, Nq, Hq, D]
    return out, lse


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_count: torch.Tensor, kv_index: torch.Tensor,
    block_size: int = 128, softmax_scale: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `flexprefill.block_sparse_attention` (step 6): exact attention over the
    selected key blocks with the token-level causal mask, computed in `dtype`."""
    mask = expand_block_mask(kv_count, kv_index, q.shape[1], k.shape[1], block_size)
    return attention_with_mask(q, k, v, mask, softmax_scale, dtype)


def flex_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    gamma: float = 0.9, tau: float = 0.1, min_budget: int = 1024,
    max_budget: Optional[int] = None, block_size: int = 128,
    softmax_scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, Selection]:
    """Reference of the fused op: select (steps 1-5, 7), then attend (step 6) in fp32."""
    sel = select_blocks(q, k, gamma, tau, min_budget, max_budget, block_size, softmax_scale)
    out, lse = block_sparse_attention(q, k, v, sel.kv_count, sel.kv_index, block_size, softmax_scale)
    return out, lse, sel
