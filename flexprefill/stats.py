"""What FlexPrefill did inside a model: per layer and head, the pattern chosen, the density
and the estimated coverage; and a picture of one head's selected blocks.

A patched model with `FlexPrefillConfig(collect_stats=True)` appends one `AttentionRecord`
per attention call (per sequence, for a padded batch) to its `FlexPrefillStats`:

    stats = flexprefill.patch_model(model, FlexPrefillConfig(collect_stats=True))
    model(**inputs)
    print(stats.summary())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .ops import Selection, causal_block_count

__all__ = ["AttentionRecord", "FlexPrefillStats", "estimate_coverage", "selected_block_grid", "render_head_png"]


@dataclass
class AttentionRecord:
    """One attention call of one layer.

    path is "sparse" (the FlexPrefill op ran) or "dense" (dense SDPA; `reason` says why:
    "short" for decode steps and short prompts, "dense_layers", "sliding_window", "mask",
    "softcap", ...). For a padded batch the sparse path runs per sequence; each sequence
    gets its own record with `batch_index` set and its own unpadded lengths.
    The per-head tensors are on the CPU, [B, Hq] (B = 1 when `batch_index` is set).
    """

    layer: Optional[int]
    path: str
    reason: str
    seqlen_q: int
    seqlen_k: int
    block_size: int
    batch_index: Optional[int] = None
    query_aware: Optional[torch.Tensor] = None  # [B, Hq] bool
    density: Optional[torch.Tensor] = None  # [B, Hq] fp32: computed blocks / causal blocks
    coverage: Optional[torch.Tensor] = None  # [B, Hq] fp32: see estimate_coverage
    selection: Optional[Selection] = None  # kept with FlexPrefillConfig(keep_selections=True)


class FlexPrefillStats:
    """Records of a patched model's attention calls, with summaries. `reset()` between runs."""

    def __init__(self):
        self.records: list[AttentionRecord] = []

    def reset(self) -> None:
        self.records.clear()

    def add(self, record: AttentionRecord) -> None:
        self.records.append(record)

    def sparse(self) -> list[AttentionRecord]:
        return [r for r in self.records if r.path == "sparse"]

    def dense(self) -> list[AttentionRecord]:
        return [r for r in self.records if r.path == "dense"]

    def ran_sparse(self) -> bool:
        return any(r.path == "sparse" for r in self.records)

    def mean_density(self) -> float:
        """Mean over the sparse calls' heads of the density (nan when none ran)."""
        return _mean([r.density for r in self.sparse()])

    def mean_coverage(self) -> float:
        return _mean([r.coverage for r in self.sparse() if r.coverage is not None])

    def query_aware_fraction(self) -> float:
        return _mean([r.query_aware.float() for r in self.sparse()])

    def attention_density(self) -> float:
        """Computed blocks over causal blocks summed over every sparse call, layer and head:
        the fraction of dense attention work the sparse calls did."""
        num = den = 0.0
        for r in self.sparse():
            causal = causal_block_count(r.seqlen_q, r.seqlen_k, r.block_size)
            num += float(r.density.double().sum()) * causal
            den += r.density.numel() * causal
        return num / den if den else float("nan")

    def per_layer(self) -> dict:
        """{layer: {"calls", "sparse_calls", "dense_reasons", "density", "coverage",
        "query_aware"}}: means over the layer's sparse calls and heads."""
        out: dict = {}
        for r in self.records:
            d = out.setdefault(
                r.layer, {"calls": 0, "sparse_calls": 0, "dense_reasons": {}, "_d": [], "_c": [], "_q": []}
            )
            d["calls"] += 1
            if r.path == "sparse":
                d["sparse_calls"] += 1
                d["_d"].append(r.density)
                d["_q"].append(r.query_aware.float())
                if r.coverage is not None:
                    d["_c"].append(r.coverage)
            else:
                d["dense_reasons"][r.reason] = d["dense_reasons"].get(r.reason, 0) + 1
        for d in out.values():
            d["density"] = _mean(d.pop("_d"))
            d["coverage"] = _mean(d.pop("_c"))
            d["query_aware"] = _mean(d.pop("_q"))
        return dict(sorted(out.items(), key=lambda kv: (kv[0] is None, kv[0] if kv[0] is not None else 0)))

    def summary(self) -> str:
        """A table: one row per layer (means over its sparse calls and heads)."""
        lines = [f"{'layer':>5} {'calls':>5} {'sparse':>6} {'density':>8} {'coverage':>8} {'q-aware':>7}  dense reasons"]
        for layer, d in self.per_layer().items():
            reasons = ", ".join(f"{k}x{v}" for k, v in d["dense_reasons"].items()) or "-"
            lines.append(
                f"{'-' if layer is None else layer:>5} {d['calls']:>5} {d['sparse_calls']:>6} "
                f"{_fmt(d['density']):>8} {_fmt(d['coverage']):>8} {_fmt(d['query_aware']):>7}  {reasons}"
            )
        lines.append(
            f"all: attention density {_fmt(self.attention_density())}, mean head coverage "
            f"{_fmt(self.mean_coverage())}, query-aware heads {_fmt(self.query_aware_fraction())}"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-friendly: per-layer summary plus every record's per-head lists."""
        return {
            "attention_density": self.attention_density(),
            "mean_coverage": self.mean_coverage(),
            "query_aware_fraction": self.query_aware_fraction(),
            "layers": {str(k): v for k, v in self.per_layer().items()},
            "records": [
                {
                    "layer": r.layer, "path": r.path, "reason": r.reason, "seqlen_q": r.seqlen_q,
                    "seqlen_k": r.seqlen_k, "block_size": r.block_size, "batch_index": r.batch_index,
                    "query_aware": None if r.query_aware is None else r.query_aware.tolist(),
                    "density": None if r.density is None else r.density.tolist(),
                    "coverage": None if r.coverage is None else r.coverage.tolist(),
                }
                for r in self.records
            ],
        }


def _mean(ts: list) -> float:
    ts = [t for t in ts if t is not None]
    if not ts:
        return float("nan")
    return float(torch.cat([t.reshape(-1).double() for t in ts]).mean())


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def selected_block_grid(selection: Selection, batch: int = 0, head: int = 0) -> torch.Tensor:
    """[NBq, NBk] bool on the CPU: key blocks each query block of one head computes."""
    cnt = selection.kv_count[batch, head].long().cpu()  # [NBq]
    idx = selection.kv_index[batch, head].long().cpu()  # [NBq, max_blocks]
    nbq = cnt.shape[0]
    nbk = idx.shape[1]
    valid = torch.arange(nbk)[None, :] < cnt[:, None]
    grid = torch.zeros(nbq, nbk + 1, dtype=torch.bool)
    grid.scatter_(1, torch.where(valid, idx, nbk), True)  # invalid entries land in a spare column
    return grid[:, :nbk]


@torch.no_grad()
def estimate_coverage(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_size: int, softmax_scale: Optional[float] = None,
    max_chunk_elements: int = 1 << 26,
) -> torch.Tensor:
    """Fraction of the representative queries' attention mass inside the selected blocks.

    q [B, Nq, Hq, D], k [B, Nk, Hkv, D] are the op's inputs and lse [B, Hq, Nq] fp32 its
    log-sum-exp over the selected blocks. The representative queries are the last
    min(block_size, Nq) rows (design.md §1, step 1); for each, the mass on its selected
    keys is exp(lse_selected - lse_all), where lse_all is its exact causal log-sum-exp
    over every key, computed here in fp32. Returns the mean over those rows, [B, Hq] fp32
    on the CPU. Extra memory: about `max_chunk_elements` fp32 logits at a time.
    """
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    s = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    m = min(block_size, Nq)
    pos = Nk - Nq + torch.arange(Nq - m, Nq, device=q.device)  # absolute positions  [m]
    bias = torch.zeros(m, Nk, device=q.device)
    bias.masked_fill_(torch.arange(Nk, device=q.device)[None, :] > pos[:, None], float("-inf"))  # [m, Nk]
    q_hat = q[:, Nq - m:].float().transpose(1, 2).reshape(B, Hkv, g * m, D)  # heads of a kv group together
    kt = k.float().permute(0, 2, 3, 1)  # [B, Hkv, D, Nk]
    lse_all = torch.empty(B, Hkv, g, m, device=q.device)
    step = max(1, max_chunk_elements // max(B * g * m * Nk, 1))
    for h0 in range(0, Hkv, step):
        logits = (q_hat[:, h0:h0 + step] @ kt[:, h0:h0 + step]) * s  # [B, c, g*m, Nk]
        logits = logits.view(B, -1, g, m, Nk) + bias
        lse_all[:, h0:h0 + step] = torch.logsumexp(logits, dim=-1)
    lse_sel = lse[:, :, Nq - m:].float().reshape(B, Hkv, g, m)
    cover = torch.exp(lse_sel - lse_all).clamp(max=1.0)  # a row that keeps every key: exactly 1 up to rounding
    return cover.mean(-1).reshape(B, Hq).cpu()


def render_head_png(
    record: AttentionRecord,
    head: int,
    path: str,
    batch: int = 0,
    title: Optional[str] = None,
) -> str:
    """Draw the key blocks one head's query blocks computed, as a PNG at `path`.

    `record` must come from a run with `FlexPrefillConfig(collect_stats=True,
    keep_selections=True)` (it holds the selection). Dark: computed blocks; light: causal
    blocks that were skipped; white: above the causal diagonal. Returns `path`.
    """
    if record.selection is None:
        raise ValueError(
            "this record holds no block selection: patch with FlexPrefillConfig(collect_stats=True, "
            "keep_selections=True) and pick a record whose path is 'sparse'"
        )
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    grid = selected_block_grid(record.selection, batch, head)  # [NBq, NBk]
    nbq, nbk = grid.shape
    bs, off = record.block_size, record.seqlen_k - record.seqlen_q
    hi = torch.tensor([off + min((r + 1) * bs, record.seqlen_q) - 1 for r in range(nbq)])
    causal = torch.arange(nbk)[None, :] <= (hi // bs)[:, None]
    picture = causal.long() + grid.long()  # 0 above diagonal, 1 skipped, 2 computed
    fig, ax = plt.subplots(figsize=(6, 6 * max(nbq, 1) / max(nbk, 1) + 0.8))
    ax.imshow(picture.numpy(), cmap=ListedColormap(["#ffffff", "#dde3ea", "#1f4e79"]), vmin=0, vmax=2,
              interpolation="nearest", aspect="equal")
    pattern = "query-aware" if record.query_aware is not None and bool(record.query_aware[batch, head]) else "vertical-slash"
    dens = "" if record.density is None else f", density {float(record.density[batch, head]):.3f}"
    cov = "" if record.coverage is None else f", coverage {float(record.coverage[batch, head]):.3f}"
    ax.set_title(title or f"layer {record.layer} head {head}: {pattern}{dens}{cov}", fontsize=9)
    ax.set_xlabel(f"key block ({bs} tokens)")
    ax.set_ylabel(f"query block ({bs} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
