"""Structured q/k/v for the tests: heads whose attention looks like a real model's.

Gaussian q/k give nearly uniform attention, on which FlexPrefill keeps almost every
block and always picks the same pattern; these inputs make both patterns occur and the
density fall clearly below 1 at the short lengths the CPU tests can afford. Each KV head
group gets one character (cycled over `kinds`):

- ``local``  RoPE locality: a shared direction rotated by position makes q_i . k_j peak
             at j = i and decay with the distance (slash lines; vertical-slash heads);
- ``sink``   attention sinks (the first keys) and a few heavy-hitter keys that every
             query attends (vertical lines; vertical-slash heads);
- ``topic``  the sequence is a run of topics (segments of `topic_len` tokens, topics
             repeating) and each query attends the earlier keys of its own topic: the
             pattern moves from one query block to the next and the block estimate is
             accurate (query-aware heads);
- ``diffuse`` plain Gaussian (near-uniform attention).

Layout: q [B, Nq, Hq, D] (the last Nq positions), k, v [B, Nk, Hkv, D].
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

KINDS = ("local", "sink", "topic", "diffuse")


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of x [B, N, H, D] at `positions` [N] (D even)."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = positions.double()[:, None] * freqs[None, :]
    cos, sin = ang.cos().float()[None, :, None, :], ang.sin().float()[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def structured_qkv(
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    *,
    kinds: Optional[Sequence[str]] = None,
    dtype: torch.dtype = torch.float32,
    topic_len: int = 64,
    strength: float = 1.5,
    device: "str | torch.device" = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, Nq, Hq, D], k, v [B, Nk, Hkv, D] drawn from torch's global CPU generator (the
    tests seed it; the values do not depend on `device`), with the head characters
    described in the module docstring. `topic_len` should be a few blocks long;
    `strength` scales every structure."""
    kinds = list(kinds) if kinds is not None else list(KINDS)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown head kind {kind!r}; supported: {', '.join(KINDS)}")
    assert seqlen_q <= seqlen_k and heads_q % heads_kv == 0 and head_dim % 2 == 0
    B, N, D, group = batch, seqlen_k, head_dim, heads_q // heads_kv
    q = torch.randn(B, N, heads_q, D) * 0.5
    k = torch.randn(B, N, heads_kv, D) * 0.5
    v = torch.randn(B, N, heads_kv, D)
    pos = torch.arange(N)
    n_topics = 4
    topics = torch.randn(n_topics, D)
    topics = topics / topics.norm(dim=-1, keepdim=True)
    seg = (pos // topic_len + torch.randint(0, n_topics, ())) % n_topics  # topic of each position
    # The logits are scaled by 1/sqrt(D): structure amplitudes grow with sqrt(sqrt(D)) so
    # that heads keep their character at every head dim.
    amp = strength * (D / 64) ** 0.25
    # Locality comes from RoPE (a component added before the rotation); sinks, heavy
    # hitters and topics are content, added after it so that they do not depend on the
    # distance (real models keep such features in RoPE's slowest dimensions).
    for hk in range(heads_kv):
        if kinds[hk % len(kinds)] == "local":
            w = torch.randn(D) / D**0.5 * 7.0 * amp
            q[:, :, hk * group:(hk + 1) * group] += w
            k[:, :, hk] += w
    q, k = _rope(q, pos), _rope(k, pos)
    for hk in range(heads_kv):
        kind = kinds[hk % len(kinds)]
        hq = slice(hk * group, (hk + 1) * group)
        if kind == "sink":
            u = torch.randn(D)
            u = u / u.norm()
            q[:, :, hq] += 6.0 * amp * u
            k[:, :2, hk] += 10.0 * amp * u  # attention sinks
            hitters = torch.randperm(N)[: max(1, N // 100)]
            k[:, hitters, hk] += 7.0 * amp * u  # heavy-hitter keys
        elif kind == "topic":
            t = topics[seg] * 7.0 * amp  # [N, D]
            q[:, :, hq] += t[None, :, None, :]
            k[:, :, hk] += t[None, :, :]
    q = q[:, N - seqlen_q:].clone()  # own storage (no offset into the full-length q)
    return tuple(t.to(device=device, dtype=dtype).contiguous() for t in (q, k, v))
