"""Typed wrappers over `torch.ops.flexprefill.*`, and their fake (meta) kernels.

Layouts (design.md §2)::

    q [B, Nq, Hq, D], k and v [B, Nk, Hkv, D]      (FlashAttention's layout), Nq <= Nk
    out [B, Nq, Hq, D] (q's dtype), lse [B, Hq, Nq] fp32 (natural log)
    kv_count [B, Hq, NBq] int32, kv_index [B, Hq, NBq, NBk] int32, query_aware [B, Hq] bool

The queries are the last Nq positions of the sequence (bottom-right causal alignment),
so a prefill chunk after an existing KV cache is `Nq < Nk`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

try:
    from . import _C  # noqa: F401  (loads the native library and registers the ops)
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "flexprefill's native library flexprefill._C is not built or does not load "
        f"({e}). Build it with `pip install --no-build-isolation -e .` (see README.md)."
    ) from e

__all__ = [
    "Selection",
    "select_blocks",
    "block_sparse_attention",
    "flex_prefill_attention",
    "supported_head_dims",
    "supported_block_sizes",
    "causal_block_count",
]


class Selection(NamedTuple):
    """Key blocks kept per (batch, query head, query block), in FlexAttention's BlockMask
    layout: `kv_index[b, h, r, :kv_count[b, h, r]]` are ascending key-block indices."""

    kv_count: torch.Tensor  # [B, Hq, NBq] int32
    kv_index: torch.Tensor  # [B, Hq, NBq, NBk] int32
    query_aware: torch.Tensor  # [B, Hq] bool: the head chose the query-aware pattern

    def density(self, seqlen_q: int, seqlen_k: int, block_size: int) -> torch.Tensor:
        """Computed blocks over causal blocks, per (batch, head): [B, Hq] fp32."""
        causal = causal_block_count(seqlen_q, seqlen_k, block_size)
        return self.kv_count.sum(-1).float() / max(causal, 1)


def causal_block_count(seqlen_q: int, seqlen_k: int, block_size: int) -> int:
    """Number of (query block, key block) pairs holding at least one causal entry."""
    off = seqlen_k - seqlen_q
    nbq = -(-seqlen_q // block_size)
    return sum((off + min((r + 1) * block_size, seqlen_q) - 1) // block_size + 1 for r in range(nbq))


def supported_head_dims(device: Union[str, torch.device] = "cpu") -> list[int]:
    """Head dims this build supports on `device` ('cpu' or 'cuda')."""
    return list(torch.ops.flexprefill.supported_head_dims(torch.device(device).type))


def supported_block_sizes(device: Union[str, torch.device] = "cpu") -> list[int]:
    """Block sizes this build supports on `device` ('cpu' or 'cuda')."""
    return list(torch.ops.flexprefill.supported_block_sizes(torch.device(device).type))


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
    """FlexPrefill's pattern selection (steps 1-5 and 7 of design.md §1).

    Args:
        q: [B, Nq, Hq, D] queries (the last Nq positions of the sequence).
        k: [B, Nk, Hkv, D] keys, Nq <= Nk, Hq a multiple of Hkv.
        gamma: attention mass to keep, in (0, 1]; 1 keeps every causal block.
        tau: JSD threshold; a head whose block estimate is within tau of the truth is
            query-aware, the others vertical-slash. 0 disables query-aware heads.
        min_budget / max_budget: bounds, in tokens, on the vertical key-block columns and
            on the slash distance bins (block_size distances each) that each head keeps;
            converted to ceil(tokens / block_size) blocks.
        block_size: tokens per block (see `supported_block_sizes`).
        softmax_scale: defaults to 1/sqrt(D).
    """
    kv_count, kv_index, query_aware = torch.ops.flexprefill.select_blocks(
        q, k, float(gamma), float(tau), int(min_budget), max_budget, int(block_size), softmax_scale
    )
    return Selection(kv_count, kv_index, query_aware)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_count: torch.Tensor,
    kv_index: torch.Tensor,
    block_size: int = 128,
    softmax_scale: Optional[float] = None,
    return_lse: bool = True,
    validate: bool = True,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Exact causal flash attention over the selected key blocks (step 6).

    Each query row attends the keys of its query block's selected key blocks that are
    causally visible (bottom-right aligned). A row that sees no key returns 0 and LSE -inf.
    `validate` checks that counts and indices are in range and ascending; on CUDA this
    synchronises with the host, so pass False under CUDA-graph capture.
    Returns out [B, Nq, Hq, D], and lse [B, Hq, Nq] fp32 when `return_lse`.
    """
    out, lse = torch.ops.flexprefill.block_sparse_attention(
        q, k, v, kv_count, kv_index, int(block_size), softmax_scale, bool(validate)
    )
    return (out, lse) if return_lse else out


def flex_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: float = 0.9,
    tau: float = 0.1,
    min_budget: int = 1024,
    max_budget: Optional[int] = None,
    block_size: int = 128,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    return_stats: bool = False,
):
    """FlexPrefill attention: `select_blocks`, then `block_sparse_attention`, in one op.

    Returns `out`, or a tuple `(out, lse)`, `(out, selection)` or `(out, lse, selection)`
    following `return_lse` and `return_stats` (`selection` is a `Selection`).
    """
    out, lse, kv_count, kv_index, query_aware = torch.ops.flexprefill.flex_prefill_attention(
        q, k, v, float(gamma), float(tau), int(min_budget), max_budget, int(block_size), softmax_scale
    )
    result = (out,)
    if return_lse:
        result += (lse,)
    if return_stats:
        result += (Selection(kv_count, kv_index, query_aware),)
    return result[0] if len(result) == 1 else result


# ----------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, for torch.compile / FakeTensor / opcheck.


def _selection_shapes(q: torch.Tensor, k: torch.Tensor, block_size: int):
    B, Nq, Hq, _ = q.shape
    nbq = (Nq + block_size - 1) // block_size
    nbk = (k.shape[1] + block_size - 1) // block_size
    return (
        q.new_empty((B, Hq, nbq), dtype=torch.int32),
        q.new_empty((B, Hq, nbq, nbk), dtype=torch.int32),
        q.new_empty((B, Hq), dtype=torch.bool),
    )


def _attention_shapes(q: torch.Tensor):
    B, Nq, Hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, Hq, Nq), dtype=torch.float32)


@torch.library.register_fake("flexprefill::select_blocks")
def _select_blocks_fake(q, k, gamma, tau, min_budget, max_budget, block_size, softmax_scale):
    return _selection_shapes(q, k, block_size)


@torch.library.register_fake("flexprefill::block_sparse_attention")
def _block_sparse_attention_fake(q, k, v, kv_count, kv_index, block_size, softmax_scale, validate=True):
    return _attention_shapes(q)


@torch.library.register_fake("flexprefill::flex_prefill_attention")
def _flex_prefill_attention_fake(q, k, v, gamma, tau, min_budget, max_budget, block_size, softmax_scale):
    return _attention_shapes(q) + _selection_shapes(q, k, block_size)
