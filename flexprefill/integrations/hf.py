"""FlexPrefill inside Hugging Face transformers, through its `AttentionInterface`.

Importing this module registers the attention implementation "flexprefill", so

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flexprefill")
    model.set_attn_implementation("flexprefill")          # or, on a loaded model
    stats = flexprefill.patch_model(model, FlexPrefillConfig(gamma=0.9, collect_stats=True))

all route a model's attention through `flexprefill_attention_forward`. Without
`patch_model` the default `FlexPrefillConfig()` applies and no statistics are kept.

Routing, per layer call (query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D] after the cache
update; the queries are the last Nq positions):

- sparse FlexPrefill op: prefill chunks longer than `dense_below`, including a chunk after
  an existing cache (Nq < Nk), with a plain causal mask, optionally with padding;
- dense SDPA (transformers' `sdpa_attention_forward`, unchanged semantics) for: decode
  steps and short chunks, `dense_layers`, sliding-window layers whose window cuts the
  keys (Mistral, Gemma 2/3 local layers keep their window), non-causal layers, masks other
  than causal + padding (a one-time warning), dropout in training, attention sinks or
  position biases, head dims the device's kernels lack, fp32 on CUDA unless
  `cuda_fp32="bf16"` (one-time warnings);
- the model's own eager attention for logit soft-capping (Gemma 2), which SDPA ignores.

Padding: the sparse op has no padding mask, so a padded batch runs the op per sequence on
its unpadded keys and queries (left or right padding); each sequence's output equals the
sequence run alone. Pad query rows get output 0.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..config import FlexPrefillConfig, LayerSettings
from ..stats import AttentionRecord, FlexPrefillStats, estimate_coverage
from . import hf_compat

__all__ = [
    "ATTENTION_NAME",
    "FlexPrefillWarning",
    "flexprefill_attention_forward",
    "patch_model",
    "unpatch_model",
    "get_stats",
    "register",
]

ATTENTION_NAME = "flexprefill"


class FlexPrefillWarning(UserWarning):
    """A layer fell back to dense attention for a reason the user may want to know."""


@dataclass
class _State:
    """Per patched model: its config, stats, the implementation to restore, and which
    one-time warnings were already given."""

    config: FlexPrefillConfig
    stats: Optional[FlexPrefillStats]
    num_layers: Optional[int] = None
    previous_implementation: Optional[str] = None
    warned: Optional[set] = None

    def warn_once(self, key: str, message: str) -> None:
        if self.warned is None:
            self.warned = set()
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, FlexPrefillWarning, stacklevel=4)


# Models loaded with attn_implementation="flexprefill" but never passed to patch_model.
_DEFAULT_STATE = _State(config=FlexPrefillConfig(), stats=None)
_STATE_ATTR = "_flexprefill_state"


def register() -> None:
    """Register "flexprefill" in transformers' attention (and mask) interfaces. Idempotent;
    runs on `import flexprefill`."""
    hf_compat.register_attention(ATTENTION_NAME, flexprefill_attention_forward)


# ----------------------------------------------------------------------------------------
# patch / unpatch


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention layers: modules with an integer `layer_idx` and q/k/v projections or a
    head_dim (what every AttentionInterface model in transformers 5 has)."""
    found = []
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int) and (
            hasattr(m, "head_dim") or hasattr(m, "q_proj") or hasattr(m, "qkv_proj")
        ):
            found.append(m)
    return found


def _num_layers(model: torch.nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def patch_model(model: torch.nn.Module, config: Optional[FlexPrefillConfig] = None) -> FlexPrefillStats:
    """Switch a loaded transformers model to FlexPrefill attention with `config`.

    Returns the `FlexPrefillStats` the model fills when `config.collect_stats` (also at
    `flexprefill.get_stats(model)`). Calling it again replaces the config; `unpatch_model`
    restores the previous attention implementation.

    Raises TypeError for a model that does not dispatch attention through transformers'
    AttentionInterface, ValueError for a config the model or its device cannot use.
    """
    config = config if config is not None else FlexPrefillConfig()
    if not isinstance(config, FlexPrefillConfig):
        raise TypeError(f"patch_model: config must be a flexprefill.FlexPrefillConfig, got {type(config).__name__}")
    if not hf_compat.supports_attention_interface(model):
        raise TypeError(
            f"patch_model: {type(model).__name__} does not dispatch its attention through transformers' "
            "AttentionInterface (model._can_set_attn_implementation() is False or missing), so FlexPrefill "
            "cannot be plugged in; supported: transformers>=5 models whose attention layers call "
            "ALL_ATTENTION_FUNCTIONS (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, ...)"
        )
    modules = _attention_modules(model)
    if not modules:
        raise TypeError(f"patch_model: found no attention layers (modules with a layer_idx) in {type(model).__name__}")
    num_layers = _num_layers(model)
    config.validate(num_layers)
    device = _model_device(model)
    block_sizes = [config.for_layer(i, num_layers) for i in range(num_layers or 0)] or [config.for_layer(None)]
    supported = ops.supported_block_sizes(device.type)
    for i, s in enumerate(block_sizes):
        if s is not None and s.block_size not in supported:
            raise ValueError(
                f"patch_model: block_size {s.block_size} (layer {i}) is not supported on {device.type}; "
                f"supported: {supported}"
            )
    register()
    previous = getattr(model, _STATE_ATTR, None)
    state = _State(
        config=config,
        stats=FlexPrefillStats(),
        num_layers=num_layers,
        previous_implementation=(
            previous.previous_implementation if previous is not None
            else hf_compat.current_attention_implementation(model)
        ),
    )
    head_dims = {getattr(m, "head_dim", None) for m in modules} - {None}
    dims = ops.supported_head_dims(device.type)
    for d in sorted(head_dims):
        if d not in dims:
            state.warn_once(
                f"head_dim{d}",
                f"flexprefill: head_dim {d} has no {device.type} kernel in this build (supported: {dims}); "
                "those layers will run dense SDPA",
            )
    hf_compat.set_attention_implementation(model, ATTENTION_NAME)
    for m in modules:
        setattr(m, _STATE_ATTR, state)
    object.__setattr__(model, _STATE_ATTR, state)
    return state.stats


def unpatch_model(model: torch.nn.Module) -> None:
    """Undo `patch_model`: restore the previous attention implementation, drop the state."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"unpatch_model: {type(model).__name__} was not patched by flexprefill.patch_model")
    hf_compat.set_attention_implementation(model, state.previous_implementation or "sdpa")
    for m in model.modules():
        if hasattr(m, _STATE_ATTR) and m is not model:
            delattr(m, _STATE_ATTR)
    object.__delattr__(model, _STATE_ATTR)


def get_stats(model: torch.nn.Module) -> Optional[FlexPrefillStats]:
    """The stats of a patched model (filled when its config has `collect_stats=True`);
    None for a model that `patch_model` did not patch."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.stats


# ----------------------------------------------------------------------------------------
# mask analysis


@dataclass
class _MaskLayout:
    """A boolean mask that is causal attention over a set of valid keys per sequence.

    seqlen_k: keys actually used (trailing never-attended keys of a static cache dropped);
    key_valid [B, seqlen_k] bool and query_valid [B, Nq] bool, or None when all are valid.
    """

    seqlen_k: int
    key_valid: Optional[torch.Tensor]
    query_valid: Optional[torch.Tensor]


_mask_cache: dict = {"ref": None, "shape": None, "layout": None}


def _analyze_mask(mask: torch.Tensor, batch: int, nq: int, nk: int) -> Optional[_MaskLayout]:
    """The layout of a [B|1, 1|H, Nq, Nk] mask if it is bottom-right causal attention over
    per-sequence valid keys (padding anywhere, a static cache's unused tail), else None.
    Cached for the last mask seen: every layer of a forward shares the same mask tensor."""
    ref = _mask_cache["ref"]
    key = (tuple(mask.shape), mask.dtype, mask.device, batch, nq, nk, mask._version)
    if ref is not None and ref() is mask and _mask_cache["shape"] == key:
        return _mask_cache["layout"]
    layout = _analyze_mask_uncached(mask, batch, nq, nk)
    try:
        _mask_cache.update(ref=weakref.ref(mask), shape=key, layout=layout)
    except TypeError:  # pragma: no cover - tensors support weak references
        pass
    return layout


def _analyze_mask_uncached(mask: torch.Tensor, batch: int, nq: int, nk: int) -> Optional[_MaskLayout]:
    if mask.dim() != 4 or mask.shape[-2] != nq or mask.shape[-1] != nk or mask.shape[0] not in (1, batch):
        return None
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        # An additive mask is honoured only if it is 0 (attend) or very negative (masked):
        # any other value is a bias (ALiBi, relative positions) the sparse op cannot add.
        masked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | masked).all()):
            return None
        allowed = ~masked
    else:
        return None
    if allowed.shape[1] != 1 and not bool((allowed == allowed[:, :1]).all()):
        return None  # different masks per head
    allowed = allowed[:, 0].expand(batch, nq, nk)  # [B, Nq, Nk]
    attended = allowed.any(1)  # [B, Nk]
    used = torch.nonzero(attended.any(0))
    if used.numel() == 0:
        return None
    seqlen_k = int(used[-1, 0]) + 1
    if seqlen_k < nq:
        return None
    allowed = allowed[..., :seqlen_k]
    key_valid = attended[:, :seqlen_k]  # [B, Nk']
    off = seqlen_k - nq
    query_valid = key_valid[:, off:]  # a query is valid iff its own position is a valid key  [B, Nq]
    causal = torch.ones(nq, seqlen_k, dtype=torch.bool, device=mask.device).tril(off)  # [Nq, Nk']
    expected = causal[None] & key_valid[:, None, :]
    mismatch = (allowed ^ expected) & query_valid[..., None]
    if bool(mismatch.any()):
        return None
    if bool(key_valid.all()):
        return _MaskLayout(seqlen_k, None, None)
    return _MaskLayout(seqlen_k, key_valid, query_valid)


# ----------------------------------------------------------------------------------------
# the attention function


def _dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """Bottom-right causal attention. q [B, Nq, Hq, D], k, v [B, Nk, Hkv, D] -> [B, Nq, Hq, D]."""
    nq, nk = q.shape[1], k.shape[1]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = qh.shape[1] != kh.shape[1]
    if nq == nk:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)


def _collecting(state: _State) -> bool:
    return state.stats is not None and state.config.collect_stats


def _record_dense(state: _State, layer, reason: str, nq: int, nk: int, settings: Optional[LayerSettings]):
    if _collecting(state):
        bs = settings.block_size if settings is not None else state.config.block_size
        state.stats.add(AttentionRecord(layer=layer, path="dense", reason=reason, seqlen_q=nq, seqlen_k=nk, block_size=bs))


def _sparse(
    state: _State, layer, settings: LayerSettings, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    scale: Optional[float], batch_index: Optional[int] = None,
) -> torch.Tensor:
    """The FlexPrefill op on q [B, Nq, Hq, D], k, v [B, Nk, Hkv, D] (no padding), with stats."""
    nq, nk = q.shape[1], k.shape[1]
    if nq <= settings.dense_below:
        _record_dense(state, layer, "short", nq, nk, settings)
        return _dense_causal(q, k, v, scale)
    out, lse, sel = ops.flex_prefill_attention(
        q, k, v, gamma=settings.gamma, tau=settings.tau, min_budget=settings.min_budget,
        max_budget=settings.max_budget, block_size=settings.block_size, softmax_scale=scale,
        return_lse=True, return_stats=True,
    )
    if _collecting(state):
        bs = settings.block_size
        keep = state.config.keep_selections
        state.stats.add(AttentionRecord(
            layer=layer, path="sparse", reason="prefill", seqlen_q=nq, seqlen_k=nk, block_size=bs,
            batch_index=batch_index,
            query_aware=sel.query_aware.cpu(),
            density=sel.density(nq, nk, bs).cpu(),
            coverage=estimate_coverage(q, k, lse, bs, scale),
            selection=ops.Selection(sel.kv_count.cpu(), sel.kv_index.cpu(), sel.query_aware.cpu()) if keep else None,
        ))
    return out


def _rows(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x[:, rows where valid] (a view when the rows are one contiguous run) and their indices."""
    idx = torch.nonzero(valid).flatten()
    if idx.numel() and int(idx[-1] - idx[0]) + 1 == idx.numel():
        return x[:, int(idx[0]) : int(idx[-1]) + 1], idx
    return x.index_select(1, idx), idx


@functools.lru_cache(maxsize=None)
def _head_dims(device_type: str) -> tuple:
    return tuple(ops.supported_head_dims(device_type))


@functools.lru_cache(maxsize=None)
def _block_sizes(device_type: str) -> tuple:
    return tuple(ops.supported_block_sizes(device_type))


def _window_cuts(sliding_window, nk: int) -> bool:
    # HF's window keeps keys with q - kv < window; with Nk < window nothing is cut, and a
    # sliding cache that dropped keys always holds Nk >= window.
    return sliding_window is not None and nk >= int(sliding_window)


def flexprefill_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (same signature as `sdpa_attention_forward`).

    query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D] (after the cache update), attention_mask
    None (plain causal) or boolean/additive [B|1, 1|H, Nq, Nk]. Returns ([B, Nq, Hq, D], None).
    """
    state: _State = getattr(module, _STATE_ATTR, None) or _DEFAULT_STATE
    layer = getattr(module, "layer_idx", None)
    settings = state.config.for_layer(layer, state.num_layers)
    B, Hq, nq, D = query.shape
    nk = key.shape[2]

    def dense(reason: str, warn: Optional[str] = None):
        if warn is not None:
            state.warn_once(reason, f"flexprefill: {warn}; running dense attention instead")
        _record_dense(state, layer, reason, nq, nk, settings)
        return hf_compat.dense_sdpa_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )

    if settings is None:
        return dense("dense_layers")
    if nq <= settings.dense_below:
        return dense("short")  # decode steps and short prompts (design.md §1, step 7)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return dense("non_causal", "a non-causal (bidirectional) attention layer")
    if _window_cuts(kwargs.get("sliding_window", getattr(module, "sliding_window", None)), nk):
        return dense("sliding_window")  # keeps the layer's window: documented, no warning
    softcap = kwargs.get("softcap", None)
    if softcap is not None:
        eager = hf_compat.eager_attention_function(module)
        state.warn_once(
            "softcap", "flexprefill: attention logit soft-capping is not supported by the sparse op; those layers "
            "run the model's eager attention" + ("" if eager is not None else " (not found: SDPA, without soft-capping)"),
        )
        if eager is None:
            return dense("softcap")
        _record_dense(state, layer, "softcap", nq, nk, settings)
        additive = _additive_mask(attention_mask, nq, nk, query)
        out, _ = eager(module, query, key, value, additive, dropout=dropout, scaling=scaling, **kwargs)
        return out, None
    for name in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(name, None) is not None:
            return dense(name, f"`{name}` (attention sinks / position bias) cannot be applied by the sparse op")
    if dropout and module.training:
        return dense("dropout", "attention dropout in training mode is not supported by the sparse op")
    if value.shape[-1] != D:
        return dense("v_head_dim", f"value head dim {value.shape[-1]} differs from the query/key head dim {D}")
    device = query.device.type
    if D not in _head_dims(device):
        return dense(f"head_dim{D}", f"head_dim {D} has no {device} kernel in this build "
                     f"(supported: {list(_head_dims(device))})")
    compute_dtype = query.dtype
    if device == "cuda" and query.dtype == torch.float32:
        if state.config.cuda_fp32 == "dense":
            return dense("fp32_cuda", "fp32 on CUDA (the kernels take bf16/fp16; set "
                         "FlexPrefillConfig(cuda_fp32='bf16') to cast instead)")
        compute_dtype = torch.bfloat16
    if settings.block_size not in _block_sizes(device):
        raise ValueError(
            f"flexprefill: block_size {settings.block_size} is not supported on {device}; "
            f"supported: {list(_block_sizes(device))}"
        )

    # [B, H, N, D] -> the op's [B, N, H, D] (views: the head dim stays contiguous)
    q = query.transpose(1, 2).to(compute_dtype)
    k = key.transpose(1, 2).to(compute_dtype)
    v = value.transpose(1, 2).to(compute_dtype)

    if attention_mask is None:
        if nq < nk:
            # No mask with Nq < Nk only comes from a static cache's first prefill, where SDPA
            # reads the mask as top-left causal: the keys past Nq are unused slots.
            k, v = k[:, :nq], v[:, :nq]
        out = _sparse(state, layer, settings, q, k, v, scaling)
        return out.to(query.dtype).contiguous(), None

    layout = _analyze_mask(attention_mask, B, nq, nk)
    if layout is None:
        return dense("mask", "the attention mask is not causal + padding (e.g. bidirectional spans or a bias)")
    k, v = k[:, : layout.seqlen_k], v[:, : layout.seqlen_k]
    if layout.key_valid is None:
        out = _sparse(state, layer, settings, q, k, v, scaling)
        return out.to(query.dtype).contiguous(), None

    # Padding: run each sequence on its valid keys and queries, write back; pad rows get 0.
    out = torch.zeros(B, nq, Hq, D, dtype=compute_dtype, device=query.device)
    for b in range(B):
        kb, _ = _rows(k[b : b + 1], layout.key_valid[b])
        vb, _ = _rows(v[b : b + 1], layout.key_valid[b])
        qb, qidx = _rows(q[b : b + 1], layout.query_valid[b])
        if qidx.numel() == 0:
            continue
        ob = _sparse(state, layer, settings, qb, kb, vb, scaling, batch_index=b)
        out[b].index_copy_(0, qidx, ob[0])
    return out.to(query.dtype), None


def _additive_mask(mask: Optional[torch.Tensor], nq: int, nk: int, like: torch.Tensor) -> torch.Tensor:
    """An additive float mask for eager attention from SDPA's convention (None = causal,
    bottom-right; bool True = attend)."""
    neg = torch.finfo(like.dtype).min
    if mask is None:
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=like.device).tril(nk - nq)[None, None]
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        return mask
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(~allowed, neg)


register()
