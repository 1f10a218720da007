"""Settings of FlexPrefill inside a model (`patch_model`), validated once, resolved per layer."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

# Fields a per-layer override may change (the selection hyper-parameters of one layer).
LAYER_FIELDS = ("gamma", "tau", "min_budget", "max_budget", "block_size", "dense_below")


@dataclass(frozen=True)
class LayerSettings:
    """The resolved settings of one attention layer (see `FlexPrefillConfig.for_layer`)."""

    gamma: float
    tau: float
    min_budget: int
    max_budget: Optional[int]
    block_size: int
    dense_below: int  # a query chunk of at most this many tokens is answered densely


@dataclass
class FlexPrefillConfig:
    """How a patched model uses FlexPrefill.

    Attributes:
        gamma: attention mass each head keeps, in (0, 1]; 1 keeps every causal block.
        tau: JSD threshold of the pattern decision; 0 disables query-aware heads.
        min_budget / max_budget: bounds, in tokens, on the vertical key-block columns and
            on the slash distance bins each head keeps; converted to ceil(tokens /
            block_size) blocks (design.md §1, step 4).
        block_size: tokens per block; must be supported on the model's device
            (`flexprefill.supported_block_sizes(device)`).
        dense_below: a query chunk of at most this many tokens (decode steps, short
            prompts) runs dense SDPA. None: the design's threshold
            `max(2 * block_size, min_budget)` (the op answers those densely anyway).
        dense_layers: indices of layers that always run dense attention.
        layer_overrides: `{layer_index: {field: value}}` for any of LAYER_FIELDS, e.g.
            `{0: {"gamma": 0.99}}` to keep more of the first layer.
        collect_stats: record, per forward and layer, the path taken and (sparse path)
            per-head pattern, density and estimated coverage in `FlexPrefillStats`.
            Coverage costs one extra [heads, block_size, seqlen_k] softmax per layer.
        keep_selections: with `collect_stats`, also keep each sparse call's block
            selection on the CPU (needed by `flexprefill.stats.render_head_png`); costs
            4 * heads * (seqlen / block_size)^2 bytes per layer and call.
        cuda_fp32: what an fp32 model does on CUDA, where the kernels take bf16/fp16 only:
            "dense" (dense SDPA, with a one-time warning) or "bf16" (q, k, v cast to
            bf16 for the sparse op and the output cast back).
    """

    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 1024
    max_budget: Optional[int] = None
    block_size: int = 128
    dense_below: Optional[int] = None
    dense_layers: tuple[int, ...] = ()
    layer_overrides: dict[int, dict] = field(default_factory=dict)
    collect_stats: bool = False
    keep_selections: bool = False
    cuda_fp32: str = "dense"

    def __post_init__(self):
        self.dense_layers = tuple(int(i) for i in self.dense_layers)
        self.layer_overrides = {int(k): dict(v) for k, v in self.layer_overrides.items()}
        self.validate()

    def validate(self, num_layers: Optional[int] = None) -> None:
        """Raise ValueError naming the first invalid field. With `num_layers`, also check
        that `dense_layers` and `layer_overrides` name existing layers."""
        _check_layer_fields("FlexPrefillConfig", {f: getattr(self, f) for f in LAYER_FIELDS})
        if self.cuda_fp32 not in ("dense", "bf16"):
            raise ValueError(f"FlexPrefillConfig.cuda_fp32 must be 'dense' or 'bf16', got {self.cuda_fp32!r}")
        if self.keep_selections and not self.collect_stats:
            raise ValueError("FlexPrefillConfig.keep_selections needs collect_stats=True")
        for layer, over in self.layer_overrides.items():
            unknown = set(over) - set(LAYER_FIELDS)
            if unknown:
                raise ValueError(
                    f"FlexPrefillConfig.layer_overrides[{layer}] has unknown fields {sorted(unknown)}; "
                    f"allowed: {list(LAYER_FIELDS)}"
                )
            _check_layer_fields(f"FlexPrefillConfig.layer_overrides[{layer}]", self._merged(layer))
        if num_layers is not None:
            for name, layers in (("dense_layers", self.dense_layers), ("layer_overrides", tuple(self.layer_overrides))):
                bad = [i for i in layers if not -num_layers <= i < num_layers]
                if bad:
                    raise ValueError(
                        f"FlexPrefillConfig.{name} names layers {bad}, but the model has {num_layers} layers"
                    )

    def _merged(self, layer: Optional[int]) -> dict:
        values = {f: getattr(self, f) for f in LAYER_FIELDS}
        if layer is not None:
            values.update(self.layer_overrides.get(layer, {}))
        return values

    def for_layer(self, layer: Optional[int], num_layers: Optional[int] = None) -> Optional[LayerSettings]:
        """The settings of layer `layer`, or None when the layer runs dense attention."""
        if layer is not None and num_layers is not None and layer < 0:
            layer += num_layers
        if layer is not None and num_layers is not None:
            dense = {i % num_layers for i in self.dense_layers}
        else:
            dense = set(self.dense_layers)
        if layer is not None and layer in dense:
            return None
        v = self._merged(layer)
        if v["dense_below"] is None:
            v["dense_below"] = max(2 * v["block_size"], v["min_budget"])  # design.md §1, step 7
        return LayerSettings(**v)

    def replace(self, **changes) -> "FlexPrefillConfig":
        return dataclasses.replace(self, **changes)


def _check_layer_fields(where: str, v: dict) -> None:
    gamma, tau = v["gamma"], v["tau"]
    if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
        raise ValueError(f"{where}: gamma must be in (0, 1], got {gamma!r}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0.0):
        raise ValueError(f"{where}: tau must be a finite number >= 0, got {tau!r}")
    if not (isinstance(v["min_budget"], int) and v["min_budget"] >= 0):
        raise ValueError(f"{where}: min_budget must be an int >= 0 tokens, got {v['min_budget']!r}")
    mb = v["max_budget"]
    if mb is not None and not (isinstance(mb, int) and mb >= max(1, v["min_budget"])):
        raise ValueError(f"{where}: max_budget must be None or an int >= max(1, min_budget={v['min_budget']}), got {mb!r}")
    bs = v["block_size"]
    if not (isinstance(bs, int) and bs > 0):
        raise ValueError(f"{where}: block_size must be a positive int, got {bs!r}")
    db = v["dense_below"]
    if db is not None and not (isinstance(db, int) and db >= 0):
        raise ValueError(f"{where}: dense_below must be None or an int >= 0, got {db!r}")
