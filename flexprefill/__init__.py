"""flexprefill: FlexPrefill (Lai et al., ICLR 2025) context-aware sparse attention for
long-context prefill, as PyTorch C++/CUDA operators (`torch.ops.flexprefill.*`)."""

from .ops import (
    Selection,
    block_sparse_attention,
    causal_block_count,
    flex_prefill_attention,
    select_blocks,
    supported_block_sizes,
    supported_head_dims,
)
from .block_mask import to_block_mask

__version__ = "0.1.0"

__all__ = [
    "Selection",
    "block_sparse_attention",
    "causal_block_count",
    "flex_prefill_attention",
    "select_blocks",
    "supported_block_sizes",
    "supported_head_dims",
    "to_block_mask",
]
