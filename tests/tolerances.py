"""The one tolerance table of the test suite, and FlashAttention's accuracy rule.

Every test file (CPU and CUDA) compares attention outputs through these helpers, so a
tolerance is changed in one place.

FlashAttention's rule (design.md §3): the kernel's max error against an fp32 (here fp64
values, fp32 logits) oracle must be at most twice the error of the same computation done
by PyTorch in the input dtype, plus a small floor. The floor only matters where PyTorch's
own error is ~0 (fp32 inputs, or a row that sees a single key).

The LSE is held to a fixed tolerance instead: every backend computes the logits of the
inputs in fp32 (as the oracle does), so its LSE does not inherit the input dtype's error.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from flexprefill import reference

# dtype -> (output floor, lse atol, lse rtol).
#   output floor: absolute slack added to the FlashAttention rule. fp32: the kernel and
#     the oracle both accumulate in fp32 over up to a few thousand keys (~1e-6 relative).
#     fp16/bf16: below the rounding of an O(1) output in that dtype, so the rule decides.
#   lse: logits are fp32 in every backend; differences come from summation order only.
TOLERANCES = {
    torch.float32: dict(out_floor=1e-5, lse_atol=1e-4, lse_rtol=2e-5),
    torch.float16: dict(out_floor=1e-4, lse_atol=1e-4, lse_rtol=2e-5),
    torch.bfloat16: dict(out_floor=1e-3, lse_atol=1e-4, lse_rtol=2e-5),
}

# Oracle dtype: values in fp64 (attention_with_mask keeps the logits in fp32).
ORACLE_DTYPE = torch.float64
# FlashAttention's factor: the kernel may be twice as wrong as PyTorch in the same dtype.
RULE_FACTOR = 2.0


def tolerance(dtype: torch.dtype) -> dict:
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {dtype}; the table has {list(TOLERANCES)}")
    return TOLERANCES[dtype]


def assert_close_flash_rule(
    out: torch.Tensor,
    out_ref: torch.Tensor,
    out_torch: torch.Tensor,
    *,
    factor: float = RULE_FACTOR,
    floor: Optional[float] = None,
    what: str = "out",
) -> None:
    """max|out - out_ref| <= factor * max|out_torch - out_ref| + floor.

    out: the kernel's output (any dtype); out_ref: the fp32/fp64 oracle; out_torch: the
    same computation by PyTorch in out's dtype. floor defaults to the table's entry for
    out.dtype. Also fails on any NaN/inf in out.
    """
    assert out.shape == out_ref.shape == out_torch.shape, (out.shape, out_ref.shape, out_torch.shape)
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite values in the kernel output"
    floor = tolerance(out.dtype)["out_floor"] if floor is None else floor
    ref = out_ref.to(torch.float64).cpu()
    err = (out.to(torch.float64).cpu() - ref).abs()
    torch_err = (out_torch.to(torch.float64).cpu() - ref).abs().max().item()
    bound = factor * torch_err + floor
    max_err = err.max().item()
    if max_err > bound:
        where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{what}: max error {max_err:.3e} at {where} exceeds {factor} x PyTorch's "
            f"{out.dtype} error {torch_err:.3e} + floor {floor:.1e} = {bound:.3e}"
        )


def assert_lse_close(lse: torch.Tensor, lse_ref: torch.Tensor, dtype: torch.dtype, what: str = "lse") -> None:
    """LSE [B, Hq, Nq] fp32 against the oracle's: same -inf entries (rows that see no
    key), finite entries within the table's atol/rtol for inputs of `dtype`."""
    assert lse.dtype == torch.float32, f"{what}: dtype {lse.dtype}, expected float32"
    assert lse.shape == lse_ref.shape, (lse.shape, lse_ref.shape)
    if lse.numel() == 0:
        return
    lse, lse_ref = lse.cpu(), lse_ref.cpu().float()
    assert not torch.isnan(lse).any(), f"{what}: NaN"
    empty_ref = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), empty_ref), f"{what}: -inf entries differ from the oracle's"
    tol = tolerance(dtype)
    torch.testing.assert_close(
        lse[~empty_ref], lse_ref[~empty_ref], atol=tol["lse_atol"], rtol=tol["lse_rtol"], msg=lambda m: f"{what}: {m}"
    )


def oracle_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, softmax_scale: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out_ref, lse_ref, out_torch): the oracle and PyTorch's same-dtype computation of
    attention under the token mask [B, Hq, Nq, Nk] (reference.attention_with_mask)."""
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    out_ref, lse_ref = reference.attention_with_mask(q, k, v, mask, softmax_scale, dtype=ORACLE_DTYPE)
    out_torch, _ = reference.attention_with_mask(q, k, v, mask, softmax_scale, dtype=q.dtype)
    return out_ref, lse_ref, out_torch


def assert_attention_matches(
    out: torch.Tensor,
    lse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    softmax_scale: Optional[float] = None,
) -> None:
    """The kernel's (out, lse) for q, k, v under the token mask [B, Hq, Nq, Nk]: output by
    the FlashAttention rule, LSE by the table."""
    assert out.dtype == q.dtype, f"out dtype {out.dtype}, expected q's {q.dtype}"
    assert out.shape == q.shape, f"out shape {tuple(out.shape)}, expected q's {tuple(q.shape)}"
    out_ref, lse_ref, out_torch = oracle_attention(q, k, v, mask, softmax_scale)
    assert_close_flash_rule(out, out_ref, out_torch)
    if lse is not None:
        assert_lse_close(lse, lse_ref, q.dtype)


def dense_causal_mask(B: int, Hq: int, Nq: int, Nk: int) -> torch.Tensor:
    """Bottom-right-aligned causal mask [B, Hq, Nq, Nk] bool."""
    causal = torch.arange(Nk)[None, :] <= (Nk - Nq + torch.arange(Nq))[:, None]
    return causal.expand(B, Hq, Nq, Nk)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
