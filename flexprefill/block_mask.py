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
    kv_count, kv_index = selection.kv_count, selection.kv_index
    # The mask_mod repeats the block selection: flex_attention's eager (uncompiled) path
    # applies only the mask_mod and ignores the block structure.
    num_k_blocks = -(-seqlen_k // block_size)
    valid = torch.arange(kv_index.shape[-1], device=kv_index.device) < kv_count[..., None]
    cols = torch.where(valid, kv_index, num_k_blocks).long()  # invalid entries -> spare column
    shape = (*kv_index.shape[:-1], num_k_blocks + 1)
    selected = torch.zeros(shape, dtype=torch.bool, device=kv_index.device).scatter_(-1, cols, True)
    selected = selected[..., :num_k_blocks]  # [B, Hq, NBq, NBk] bool

    def selected_and_causal(b, h, q_idx, kv_idx):
        return selected[b, h, q_idx // block_size, kv_idx // block_size] & (kv_idx <= q_idx + off)

    # Blocks that every row of the query block sees whole are "full": the compiled kernel
    # then skips the mask_mod there and evaluates it only on the diagonal blocks.
    nbq = kv_index.shape[2]
    first_row = off + torch.arange(nbq, device=kv_index.device)[:, None] * block_size  # [NBq, 1]
    block_end = (kv_index.long() + 1) * block_size  # one past the block's last key
    full = valid & (block_end - 1 <= first_row) & (block_end <= seqlen_k)  # [B, Hq, NBq, M]
    partial = valid & ~full

    def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept entries of kv_index, ascending and first: (count, indices) int32."""
        spare = torch.iinfo(torch.int32).max
        indices = torch.sort(torch.where(keep, kv_index, spare), dim=-1).values
        return keep.sum(-1, dtype=torch.int32), torch.where(indices == spare, 0, indices).to(torch.int32)

    partial_count, partial_index = compact(partial)
    full_count, full_index = compact(full)
    return BlockMask.from_kv_blocks(
        partial_count,
        partial_index,
        full_count,
        full_index,
        BLOCK_SIZE=block_size,
        mask_mod=selected_and_causal,
        seq_lengths=(seqlen_q, seqlen_k),
    )
