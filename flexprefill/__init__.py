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
from .config import FlexPrefillConfig
from .stats import FlexPrefillStats, render_head_png

# The Hugging Face integration needs transformers (pip install 'flexprefill[hf]'); without
# it `import flexprefill` still works and these names are absent. Importing it registers
# the "flexprefill" attention implementation in transformers' AttentionInterface.
try:
    from .integrations.hf import FlexPrefillWarning, get_stats, patch_model, unpatch_model
except ImportError as _hf_import_error:
    if not getattr(_hf_import_error, "transformers_unavailable", False):
        raise  # a real error inside the integration: never hide it
    HF_IMPORT_ERROR: "ImportError | None" = _hf_import_error  # transformers missing or unsupported
else:
    HF_IMPORT_ERROR = None

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
    "FlexPrefillConfig",
    "FlexPrefillStats",
    "render_head_png",
]
if HF_IMPORT_ERROR is None:
    __all__ += ["FlexPrefillWarning", "get_stats", "patch_model", "unpatch_model"]
