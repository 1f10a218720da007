"""The Hugging Face integration on tiny random models (CPU): routing, equality with dense
attention at gamma=1, padding, chunked prefill, decode, sliding windows, fallbacks, stats.

The sparse path is made to run on ~100-300 tokens with block_size=16 and min_budget=16
(dense below max(2*16, 16) = 32 query tokens); every test that claims the sparse path ran
checks it in the recorded statistics.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flexprefill  # noqa: E402
from flexprefill import FlexPrefillConfig, FlexPrefillWarning  # noqa: E402
from flexprefill import reference  # noqa: E402
from flexprefill.integrations import hf as hf_integration  # noqa: E402
from flexprefill.stats import render_head_png  # noqa: E402

# Logit tolerance of a 2-layer model, patched vs dense SDPA, same weights and inputs: the
# sparse op accumulates in fp32 in a different order than SDPA (fp32); bf16 rounds once
# per layer op.
LOGIT_ATOL = {torch.float32: 2e-4, torch.bfloat16: 0.1}

VOCAB = 256
BS = 16


def sparse_config(**kw) -> FlexPrefillConfig:
    base = dict(gamma=1.0, tau=0.1, block_size=BS, min_budget=BS, collect_stats=True)
    base.update(kw)
    return FlexPrefillConfig(**base)


def _common(**kw):
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    )
    base.update(kw)
    return base


def make_model(kind: str, **overrides):
    """A tiny random causal LM of the given family (2 layers, eval mode, fp32, sdpa)."""
    T = transformers
    torch.manual_seed(0)
    if kind == "llama":
        cfg, cls = T.LlamaConfig(**_common(**overrides)), T.LlamaForCausalLM
    elif kind == "mistral":
        cfg, cls = T.MistralConfig(**_common(**{"sliding_window": None, **overrides})), T.MistralForCausalLM
    elif kind == "qwen2":
        cfg, cls = T.Qwen2Config(**_common(**overrides)), T.Qwen2ForCausalLM
    elif kind == "qwen3":
        cfg, cls = T.Qwen3Config(**_common(**overrides)), T.Qwen3ForCausalLM
    elif kind == "gemma2":
        base = dict(attn_logit_softcapping=None, final_logit_softcapping=None, sliding_window=32,
                    layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
        base.update(overrides)
        cfg, cls = T.Gemma2Config(**_common(**base)), T.Gemma2ForCausalLM
    elif kind == "gemma3":
        base = dict(head_dim=256, num_attention_heads=2, num_key_value_heads=1, sliding_window=32,
                    layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=256)
        base.update(overrides)
        cfg, cls = T.Gemma3TextConfig(**_common(**base)), T.Gemma3ForCausalLM
    elif kind == "phi3":
        base = dict(sliding_window=None, pad_token_id=0)
        base.update(overrides)
        base.pop("head_dim", None)  # Phi-3 derives it: hidden_size / num_attention_heads = 16
        cfg, cls = T.Phi3Config(**_common(**base)), T.Phi3ForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "sdpa"
    return cls(cfg).eval()


def ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, n), generator=g)


@torch.no_grad()
def logits(model, input_ids, **kw) -> torch.Tensor:
    return model(input_ids=input_ids, **kw).logits


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("n", [131, 200])
def test_gamma_one_matches_dense(kind, n):
    model = make_model(kind)
    x = ids(n)
    dense = logits(model, x)
    stats = flexprefill.patch_model(model, sparse_config())
    patched = logits(model, x)
    assert model.config._attn_implementation == "flexprefill"
    sparse = stats.sparse()
    assert sparse, f"the sparse path never ran: {stats.summary()}"
    assert all(r.seqlen_q == n and r.seqlen_k == n for r in sparse)
    assert all(bool((r.density == 1.0).all()) for r in sparse)  # gamma=1 keeps every causal block
    assert all(bool((r.coverage > 0.9999).all()) for r in sparse)
    torch.testing.assert_close(patched, dense, atol=LOGIT_ATOL[torch.float32], rtol=0)
    if kind in ("gemma2", "gemma3"):  # layer 0 is a sliding layer (window 32 < n): dense
        assert {r.layer for r in sparse} == {1}
        assert [r.reason for r in stats.dense()] == ["sliding_window"]
    else:
        assert {r.layer for r in sparse} == {0, 1}


@pytest.mark.parametrize("kind", FAMILIES)
def test_sparse_generation_reports_stats(kind):
    model = make_model(kind)
    stats = flexprefill.patch_model(model, sparse_config(gamma=0.9, keep_selections=True))
    x = ids(180)
    out = model.generate(x, max_new_tokens=4, do_sample=False, min_new_tokens=4, pad_token_id=0)
    assert out.shape == (1, 184)
    sparse = stats.sparse()
    assert sparse, stats.summary()
    for r in sparse:
        assert r.density.shape == r.query_aware.shape == r.coverage.shape == (1, model.config.num_attention_heads)
        assert bool(((r.density > 0) & (r.density <= 1)).all())
        assert bool(((r.coverage >= 0) & (r.coverage <= 1 + 1e-5)).all())
    # each decode step (one query) ran dense SDPA on every layer
    decode = [r for r in stats.dense() if r.reason == "short"]
    assert len(decode) == 3 * model.config.num_hidden_layers and all(r.seqlen_q == 1 for r in decode)
    table = stats.summary()
    assert "density" in table and "coverage" in table
    d = stats.to_dict()
    assert d["records"] and 0 < d["attention_density"] <= 1


def test_low_gamma_is_sparse_and_close():
    """gamma < 1 really skips blocks on a structured input, and stays close to dense."""
    model = make_model("llama", max_position_embeddings=1024)
    x = ids(600)
    dense = logits(model, x)
    stats = flexprefill.patch_model(model, sparse_config(gamma=0.5, tau=0.0, min_budget=32))
    patched = logits(model, x)
    assert stats.attention_density() < 0.9, stats.summary()
    assert stats.query_aware_fraction() == 0.0  # tau=0 disables query-aware heads
    # random weights give near-uniform attention, so dropping mass moves the logits, but
    # they stay in the same range
    assert (patched - dense).abs().max() < 0.5 * dense.abs().max()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(padding_side):
    model = make_model("llama")
    flexprefill.patch_model(model, sparse_config(gamma=0.8))
    lengths = [230, 150, 30]  # the last one is short after unpadding: dense for that sequence
    n = max(lengths)
    x = ids(n, batch=len(lengths), seed=5)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, L in enumerate(lengths):
        if padding_side == "left":
            mask[b, n - L:] = 1
        else:
            mask[b, :L] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    stats = flexprefill.get_stats(model)
    stats.reset()
    batched = logits(model, x, attention_mask=mask, position_ids=position_ids)
    per_seq = [r for r in stats.sparse() if r.batch_index is not None]
    assert {(r.batch_index, r.seqlen_q) for r in per_seq} == {(0, 230), (1, 150)}
    assert any(r.reason == "short" and r.seqlen_q == 30 for r in stats.dense())
    for b, L in enumerate(lengths):
        valid = mask[b].bool()
        alone = logits(model, x[b : b + 1, valid])
        torch.testing.assert_close(batched[b, valid], alone[0], atol=LOGIT_ATOL[torch.float32], rtol=0)


def test_padded_generate_matches_unpadded():
    model = make_model("qwen2")
    flexprefill.patch_model(model, sparse_config(gamma=0.9))
    a, b = ids(160, seed=2)[0], ids(120, seed=3)[0]
    x = torch.zeros(2, 160, dtype=torch.long)
    mask = torch.zeros(2, 160, dtype=torch.long)
    x[0], mask[0] = a, 1
    x[1, 40:], mask[1, 40:] = b, 1
    out = model.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = model.generate(b[None], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1, 160:], alone[0, 120:])


def reference_op(q, k, v, gamma, tau, min_budget, max_budget, block_size, softmax_scale, return_lse, return_stats):
    """flexprefill.flex_prefill_attention computed by the pure-PyTorch oracle."""
    out, lse, sel = reference.flex_prefill_attention(q, k, v, gamma, tau, min_budget, max_budget, block_size, softmax_scale)
    assert return_lse and return_stats
    return out.to(q.dtype), lse, flexprefill.Selection(*sel)


@pytest.mark.parametrize("gamma", [1.0, 0.85])
def test_chunked_prefill_with_cache(gamma, monkeypatch):
    """A second prefill chunk after a DynamicCache (Nq < Nk) takes the sparse path, with
    the chunk's queries bottom-right aligned to the cached keys."""
    model = make_model("llama")
    x = ids(220)
    dense = logits(model, x)
    stats = flexprefill.patch_model(model, sparse_config(gamma=gamma))

    def chunked():
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            first = model(input_ids=x[:, :120], past_key_values=cache, use_cache=True).logits
            second = model(input_ids=x[:, 120:], past_key_values=cache, use_cache=True).logits
        return torch.cat([first, second], 1)

    out = chunked()
    chunk = [r for r in stats.sparse() if r.seqlen_q == 100]
    assert len(chunk) == 2 and all(r.seqlen_k == 220 for r in chunk), stats.summary()
    if gamma == 1.0:
        torch.testing.assert_close(out, dense, atol=LOGIT_ATOL[torch.float32], rtol=0)
    else:
        assert any(bool((r.density < 1).any()) for r in chunk), "gamma=0.85 skipped no block"
        monkeypatch.setattr(hf_integration.ops, "flex_prefill_attention", reference_op)
        torch.testing.assert_close(out, chunked(), atol=LOGIT_ATOL[torch.float32], rtol=0)


def test_decode_path_is_dense_sdpa():
    model = make_model("llama")
    x = ids(150)
    ref = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    stats = flexprefill.patch_model(model, sparse_config())
    out = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert len(stats.sparse()) == 2  # the prefill, both layers
    assert all(r.seqlen_q == 1 and r.reason == "short" for r in stats.dense())


def test_static_cache_generate():
    """A StaticCache prefill passes keys padded to the cache length with no mask (SDPA's
    top-left causal); the unused slots must be ignored."""
    model = make_model("llama")
    x = ids(150)
    ref = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    stats = flexprefill.patch_model(model, sparse_config())
    out = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(out, ref)
    assert [(r.seqlen_q, r.seqlen_k) for r in stats.sparse()] == [(150, 150)] * 2


def test_short_prompt_stays_dense():
    model = make_model("llama")
    stats = flexprefill.patch_model(model, sparse_config(dense_below=64))
    x = ids(64)
    dense_model = make_model("llama")
    torch.testing.assert_close(logits(model, x), logits(dense_model, x), atol=1e-5, rtol=0)
    assert not stats.ran_sparse() and all(r.reason == "short" for r in stats.records)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_layers_stay_dense(kind):
    over = {"sliding_window": 48}
    if kind == "qwen2":
        over.update(use_sliding_window=True, max_window_layers=0, layer_types=["sliding_attention"] * 2)
    model = make_model(kind, **over)
    x = ids(200)
    dense = logits(model, x)
    stats = flexprefill.patch_model(model, sparse_config())
    patched = logits(model, x)
    assert not stats.ran_sparse()
    assert [r.reason for r in stats.records] == ["sliding_window"] * 2
    torch.testing.assert_close(patched, dense, atol=1e-5, rtol=0)


def test_window_longer_than_prompt_allows_sparse():
    model = make_model("mistral", sliding_window=400)
    x = ids(200)
    dense = logits(model, x)
    stats = flexprefill.patch_model(model, sparse_config())
    torch.testing.assert_close(logits(model, x), dense, atol=LOGIT_ATOL[torch.float32], rtol=0)
    assert len(stats.sparse()) == 2


def test_dense_layers_and_overrides():
    model = make_model("llama")
    stats = flexprefill.patch_model(
        model, sparse_config(gamma=0.9, dense_layers=(0,), layer_overrides={1: {"gamma": 1.0}})
    )
    logits(model, ids(150))
    assert [r.reason for r in stats.dense()] == ["dense_layers"]
    (rec,) = stats.sparse()
    assert rec.layer == 1 and bool((rec.density == 1).all())


def test_non_causal_mask_falls_back_with_warning():
    model = make_model("llama")
    x = ids(120)
    n = x.shape[1]
    # causal, plus a bidirectional prefix of 40 tokens (prefix-LM): not honourable sparsely
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[:40, :40] = True
    mask4d = allowed[None, None]
    dense = logits(model, x, attention_mask=mask4d)
    stats = flexprefill.patch_model(model, sparse_config())
    with pytest.warns(FlexPrefillWarning, match="not causal"):
        patched = logits(model, x, attention_mask=mask4d)
    torch.testing.assert_close(patched, dense, atol=1e-5, rtol=0)
    assert not stats.ran_sparse() and {r.reason for r in stats.records} == {"mask"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlexPrefillWarning)  # one-time: no second warning
        logits(model, x, attention_mask=mask4d)


def test_causal_4d_mask_is_sparse():
    model = make_model("llama")
    x = ids(120)
    mask4d = torch.ones(120, 120, dtype=torch.bool).tril()[None, None]
    dense = logits(model, x)
    stats = flexprefill.patch_model(model, sparse_config())
    torch.testing.assert_close(logits(model, x, attention_mask=mask4d), dense, atol=LOGIT_ATOL[torch.float32], rtol=0)
    assert len(stats.sparse()) == 2


def test_softcap_uses_eager_attention():
    model = make_model("gemma2", attn_logit_softcapping=20.0)
    x = ids(150)
    model.set_attn_implementation("eager")
    eager = logits(model, x)
    stats = flexprefill.patch_model(model, sparse_config())
    with pytest.warns(FlexPrefillWarning, match="soft-capping"):
        patched = logits(model, x)
    torch.testing.assert_close(patched, eager, atol=1e-5, rtol=0)
    assert {r.reason for r in stats.records} == {"sliding_window", "softcap"}


def test_unsupported_head_dim_falls_back():
    model = make_model("llama", hidden_size=48, head_dim=12)  # 12 is not a multiple of 8
    x = ids(100)
    dense = logits(model, x)
    with pytest.warns(FlexPrefillWarning, match="head_dim 12"):
        stats = flexprefill.patch_model(model, sparse_config())
    torch.testing.assert_close(logits(model, x), dense, atol=1e-5, rtol=0)
    assert not stats.ran_sparse()


def test_bf16_model():
    model = make_model("qwen3").to(torch.bfloat16)
    x = ids(200)
    dense = logits(model, x).float()
    stats = flexprefill.patch_model(model, sparse_config())
    patched = logits(model, x).float()
    assert len(stats.sparse()) == 2
    torch.testing.assert_close(patched, dense, atol=LOGIT_ATOL[torch.bfloat16], rtol=0)


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    model = make_model("llama")
    model.save_pretrained(tmp_path)
    x = ids(150)
    dense = logits(model, x)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="flexprefill")
    assert loaded.config._attn_implementation == "flexprefill"
    # default config: min_budget 1024, so 150 tokens stay dense
    torch.testing.assert_close(logits(loaded.eval(), x), dense, atol=1e-5, rtol=0)
    model.set_attn_implementation("flexprefill")
    assert model.config._attn_implementation == "flexprefill"
    stats = flexprefill.patch_model(model, sparse_config())
    torch.testing.assert_close(logits(model, x), dense, atol=LOGIT_ATOL[torch.float32], rtol=0)
    assert stats.ran_sparse()


def test_unpatch_restores_previous_implementation():
    model = make_model("llama")
    stats = flexprefill.patch_model(model, sparse_config())
    flexprefill.patch_model(model, sparse_config(gamma=0.95))  # re-patching keeps the original to restore
    flexprefill.unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"
    logits(model, ids(100))
    assert not stats.records
    assert flexprefill.get_stats(model) is None
    with pytest.raises(ValueError, match="not patched"):
        flexprefill.unpatch_model(model)


def test_render_head_png(tmp_path):
    model = make_model("llama")
    stats = flexprefill.patch_model(model, sparse_config(gamma=0.7, keep_selections=True))
    logits(model, ids(250))
    rec = stats.sparse()[0]
    path = render_head_png(rec, head=1, path=str(tmp_path / "head.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    grid = flexprefill.stats.selected_block_grid(rec.selection, 0, 1)
    assert grid.shape == (16, 16) and int(grid.sum()) == int(rec.selection.kv_count[0, 1].sum())
    with pytest.raises(ValueError, match="keep_selections"):
        render_head_png(flexprefill.stats.AttentionRecord(0, "dense", "short", 1, 1, 16), 0, str(tmp_path / "x.png"))


@pytest.mark.parametrize("nq, nk", [(200, 200), (150, 260), (37, 300)])
def test_estimate_coverage_matches_explicit_mass(nq, nk):
    """exp(lse_selected - lse_all) equals the attention mass of the last block_size rows
    inside their selected blocks, summed explicitly over the expanded block mask."""
    torch.manual_seed(nq)
    B, Hq, Hkv, D = 2, 4, 2, 16
    q, k, v = torch.randn(B, nq, Hq, D), torch.randn(B, nk, Hkv, D), torch.randn(B, nk, Hkv, D)
    out, lse, sel = flexprefill.flex_prefill_attention(
        q, k, v, gamma=0.6, tau=0.0, min_budget=16, block_size=BS, return_lse=True, return_stats=True
    )
    cover = flexprefill.stats.estimate_coverage(q, k, lse, BS, max_chunk_elements=1000)
    keep = reference.expand_block_mask(sel.kv_count, sel.kv_index, nq, nk, BS)  # [B, Hq, Nq, Nk]
    full = reference.expand_block_mask(
        torch.full_like(sel.kv_count, -(-nk // BS)), torch.arange(-(-nk // BS), dtype=torch.int32).expand_as(sel.kv_index).contiguous(),
        nq, nk, BS,
    )
    kh = k.repeat_interleave(Hq // Hkv, 2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, kh) / D**0.5
    probs = torch.softmax(logits.masked_fill(~full, float("-inf")), -1)
    m = min(BS, nq)
    expected = (probs * keep)[:, :, nq - m:].sum(-1).mean(-1)
    torch.testing.assert_close(cover, expected, atol=1e-5, rtol=0)
    assert float(cover.min()) < 0.999  # the selection really dropped mass


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=1.5), "gamma"),
        (dict(tau=-1.0), "tau"),
        (dict(min_budget=-1), "min_budget"),
        (dict(min_budget=64, max_budget=32), "max_budget"),
        (dict(block_size=0), "block_size"),
        (dict(dense_below=-3), "dense_below"),
        (dict(layer_overrides={0: {"gama": 0.5}}), "unknown fields"),
        (dict(layer_overrides={0: {"gamma": 2.0}}), r"layer_overrides\[0\]: gamma"),
        (dict(cuda_fp32="fp64"), "cuda_fp32"),
        (dict(keep_selections=True), "collect_stats"),
    ],
)
def test_bad_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlexPrefillConfig(**kwargs)


def test_incompatible_model_or_config_errors():
    model = make_model("llama")
    with pytest.raises(ValueError, match="dense_layers names layers"):
        flexprefill.patch_model(model, sparse_config(dense_layers=(5,)))
    with pytest.raises(ValueError, match="block_size 48 .* not supported on cpu"):
        flexprefill.patch_model(model, sparse_config(block_size=48))
    with pytest.raises(TypeError, match="AttentionInterface"):
        flexprefill.patch_model(torch.nn.Linear(4, 4), sparse_config())
    with pytest.raises(TypeError, match="FlexPrefillConfig"):
        flexprefill.patch_model(model, {"gamma": 0.9})
    assert model.config._attn_implementation == "sdpa"  # failed patches change nothing


def test_import_without_transformers():
    """`import flexprefill` works when transformers is missing; the HF names are absent."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import flexprefill\n"
        "assert flexprefill.HF_IMPORT_ERROR is not None and 'transformers' in str(flexprefill.HF_IMPORT_ERROR)\n"
        "assert not hasattr(flexprefill, 'patch_model') and 'patch_model' not in flexprefill.__all__\n"
        "flexprefill.FlexPrefillConfig(gamma=0.9)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
