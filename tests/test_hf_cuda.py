"""The Hugging Face integration on the GPU: tiny random models in bf16 whose attention
goes through the CUDA ops (selection and sparse attention) during prefill.

gamma = 1 must reproduce the dense model's logits (bf16 tolerance); gamma < 1 must run a
prefill + generation through the sparse path and report statistics.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flexprefill  # noqa: E402
from flexprefill import FlexPrefillConfig  # noqa: E402

pytestmark = pytest.mark.cuda

BS = 64
N = 700  # sparse path: above max(2 * 64, 64) query tokens


def make_model(kind: str, head_dim: int) -> torch.nn.Module:
    T = transformers
    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=2048)
    torch.manual_seed(0)
    if kind == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**common))
    elif kind == "qwen3":
        model = T.Qwen3ForCausalLM(T.Qwen3Config(**common))
    elif kind == "gemma3":
        cfg = T.Gemma3TextConfig(**common, sliding_window=128, layer_types=["sliding_attention", "full_attention"])
        model = T.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.config._attn_implementation = "sdpa"
    return model.to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize("kind,head_dim", [("llama", 64), ("qwen3", 128), ("gemma3", 256)])
def test_gamma_one_matches_dense_on_cuda(kind, head_dim):
    model = make_model(kind, head_dim)
    ids = torch.randint(0, 512, (2, N), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits.float()
    stats = flexprefill.patch_model(model, FlexPrefillConfig(gamma=1.0, block_size=BS, min_budget=BS,
                                                             collect_stats=True))
    with torch.no_grad():
        patched = model(ids).logits.float()
    sparse = stats.sparse()
    assert sparse, f"the sparse path never ran: {stats.summary()}"
    assert all(bool((r.density == 1.0).all()) for r in sparse)
    # bf16 model: both paths round once per op; compare against the spread of the logits.
    err = (patched - dense).abs().max().item()
    assert err <= 0.05 * dense.abs().max().item(), f"max logit difference {err}"


def test_sparse_prefill_and_generate_on_cuda():
    model = make_model("llama", 128)
    stats = flexprefill.patch_model(model, FlexPrefillConfig(gamma=0.9, tau=0.1, block_size=BS, min_budget=BS,
                                                             collect_stats=True))
    ids = torch.randint(1, 512, (1, 2 * N), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 2 * N + 4)
    sparse = stats.sparse()
    assert sparse and all(r.seqlen_q == 2 * N for r in sparse), stats.summary()
    assert 0.0 < stats.mean_density() <= 1.0
    assert len(stats.dense()) > 0  # the decode steps went to dense attention
