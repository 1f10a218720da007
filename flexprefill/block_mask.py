"""Interoperation with PyTorch FlexAttention: a selection as a `BlockMask`."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from .ops import Selection


def to_block_mask(selection: Selection, seqlen_q: int, seqlen_k: int, block_size: int = 128) -> BlockMask:
    """The `BlockMask` that makes `flex_attention(q, k, v, block_mask=..., enable_gqa=True)`
    compute exactly what `block_sparse_attention` computes for this selection: the
    selected key blocks, with the bottom-right-aligned causal mask inside them.

    FlexAttention takes q, k, v as [B, H, N, D] (transpose ours with `.transpose(1, 2)`).
    """
    off = seqlen_k - seqlen_q

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + off

    return BlockMask.from_kv_blocks(
        selection.kv_count,
        selection.kv_index,
        BLOCK_SIZE=block_size,
        mask_mod=causal,
        seq_lengths=(seqlen_q, seqlen_k),
    )
