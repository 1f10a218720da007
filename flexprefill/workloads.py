"""Structured attention workloads for benchmarks and examples.

Gaussian random q/k make attention nearly uniform, which says little about a sparse
method (design.md §3). These generators give heads of different character, as real
models have:

- ``local``: RoPE-style locality, attention concentrated near the diagonal (slash lines);
- ``sink``: attention sinks and heavy-hitter keys (vertical lines);
- ``topic``: the text is a sequence of topics and queries attend to earlier keys of their
  own topic, a pattern that changes from one query block to the next (query-aware heads);
- ``diffuse``: plain Gaussian heads (near-uniform attention).

All tensors are in FlashAttention's layout: q [B, N, Hq, D], k and v [B, N, Hkv, D].
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

HEAD_KINDS = ("local", "sink", "topic", "diffuse")


def _rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x [B, N, H, D] (positions 0..N-1)."""
    N, D = x.shape[1], x.shape[-1]
    half = D // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = torch.arange(N, device=x.device, dtype=torch.float32)[:, None] * freqs[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def structured_qkv(
    batch: int,
    seqlen: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    *,
    seqlen_q: Optional[int] = None,
    kinds: Optional[Sequence[str]] = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    generator: Optional[torch.Generator] = None,
    topic_len: int = 512,
    num_topics: int = 6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, Nq, Hq, D] (the last Nq positions), k, v [B, N, Hkv, D] with structure.

    `kinds` gives the character of each KV head's group (cycled); by default the groups
    cycle through ``HEAD_KINDS``. Values are Gaussian.
    """
    seqlen_q = seqlen if seqlen_q is None else seqlen_q
    kinds = list(kinds) if kinds is not None else list(HEAD_KINDS)
    for kind in kinds:
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}; supported: {', '.join(HEAD_KINDS)}")
    g = generator
    B, N, D, group = batch, seqlen, head_dim, heads_q // heads_kv

    # Random draws happen on the generator's device (so a CUDA generator works), then move.
    gdev = g.device if g is not None else torch.device(device)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=gdev).to(device)

    q = randn(B, N, heads_q, D) * 0.5
    k = randn(B, N, heads_kv, D) * 0.5
    v = randn(B, N, heads_kv, D)
    pos = torch.arange(N, device=device)
    # Segments of topic_len tokens, each on one of a few recurring topics.
    n_segments = max(1, math.ceil(N / topic_len))
    topics = randn(num_topics, D)
    topics = topics / topics.norm(dim=-1, keepdim=True)
    seg_topic = torch.randint(0, num_topics, (n_segments,), generator=g, device=gdev).to(device)
    seg = seg_topic[pos // topic_len]  # topic of each position  [N]
    # Noise is rotated by RoPE; the structure of each head kind is added after it.
    content_q, content_k = torch.zeros_like(q), torch.zeros_like(k)
    for hk in range(heads_kv):
        kind = kinds[hk % len(kinds)]
        hq = slice(hk * group, (hk + 1) * group)
        if kind == "local":
            # q_i . k_j = a^2 sum_f cos(w_f (i - j)) over random frequencies w_f: a peak
            # at i = j that decays over ~1/max(w) tokens (a sliding-window-like head).
            half = D // 2
            w = torch.rand(half, generator=g, device=gdev).to(device) * 0.08
            ang = pos[:, None].float() * w[None, :]  # [N, half]
            emb = torch.cat([ang.cos(), ang.sin()], dim=-1) * math.sqrt(12.0 * math.sqrt(D) / half)
            content_q[:, :, hq] += emb[None, :, None, :]
            content_k[:, :, hk] += emb[None, :, :]
        elif kind == "sink":
            u = randn(D)
            u = u / u.norm()
            content_q[:, :, hq] += 6.0 * u
            content_k[:, :4, hk] += 14.0 * u  # attention sinks
            hitters = torch.randperm(N, generator=g, device=gdev)[: max(1, N // 256)].to(device)
            content_k[:, hitters, hk] += 10.0 * u  # heavy-hitter keys
        elif kind == "topic":
            t = topics[seg] * 7.0  # [N, D]
            content_q[:, :, hq] += t[None, :, None, :]
            content_k[:, :, hk] += t[None, :, :]
    q, k = _rope(q) + content_q, _rope(k) + content_k
    q = q[:, N - seqlen_q:]
    return q.to(dtype).contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()
