"""Everything flexprefill needs from transformers' internals, in one place.

Written against transformers 5.x (tested with 5.17). When a transformers release moves one
of these names, this is the only module to change.
"""

from __future__ import annotations

from typing import Callable

import torch

try:
    import transformers
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
except ImportError as e:  # pragma: no cover - exercised only without transformers >= 5
    err = ImportError(
        "flexprefill's Hugging Face integration needs transformers>=5.0,<6 "
        "(pip install 'flexprefill[hf]'); import failed: " + str(e)
    )
    err.transformers_unavailable = True  # `import flexprefill` tolerates only this error
    raise err from e

TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
if not (5, 0) <= TRANSFORMERS_VERSION < (6, 0):  # pragma: no cover
    err = ImportError(
        f"flexprefill's Hugging Face integration supports transformers>=5.0,<6, found {transformers.__version__}"
    )
    err.transformers_unavailable = True
    raise err

__all__ = [
    "ALL_ATTENTION_FUNCTIONS",
    "AttentionInterface",
    "AttentionMaskInterface",
    "current_attention_implementation",
    "dense_sdpa_forward",
    "register_attention",
    "set_attention_implementation",
    "supports_attention_interface",
]

# transformers' own dense path: (module, query [B,H,Nq,D], key, value [B,Hkv,Nk,D],
# attention_mask, dropout, scaling, is_causal, position_bias, **kwargs) -> ([B,Nq,H,D], None)
dense_sdpa_forward = sdpa_attention_forward


def register_attention(name: str, attention_fn: Callable) -> None:
    """Register `attention_fn` under `name` for every model, with SDPA's mask builder.

    Without a mask builder, transformers passes `attention_mask=None` to a custom attention
    function (it assumes the function needs no mask), which silently drops padding and
    sliding windows. SDPA's builder gives None for plain causal attention and a boolean
    [B, 1, Nq, Nk] mask (True = attend) otherwise, which is what the function expects.
    """
    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def supports_attention_interface(model: torch.nn.Module) -> bool:
    """Whether the model dispatches its attention through transformers' AttentionInterface."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    return callable(can_set) and bool(can_set()) and hasattr(getattr(model, "config", None), "_attn_implementation")


def current_attention_implementation(model: torch.nn.Module) -> str:
    return model.config._attn_implementation


def set_attention_implementation(model: torch.nn.Module, name: str) -> None:
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(
            f"transformers did not switch {type(model).__name__} to attn_implementation={name!r} "
            f"(it reports {model.config._attn_implementation!r})"
        )


def eager_attention_function(module: torch.nn.Module) -> Callable | None:
    """The model's own `eager_attention_forward` (it implements extras such as Gemma 2's
    logit soft-capping that SDPA ignores), found in the module that defines the layer."""
    import sys

    mod = sys.modules.get(type(module).__module__)
    return getattr(mod, "eager_attention_forward", None)
