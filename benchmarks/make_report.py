"""Regenerate BENCHMARKS.md from the JSON files that the benchmark scripts write.

    python benchmarks/make_report.py --run DIR "COMMAND" [--run DIR2 "COMMAND2" ...]

Each run directory holds the JSON files of ONE run (bench_fused.json, bench_selection.json,
bench_attention.json); its section names the command that produced them, and all ratios
in a section come from that run. Numbers are never edited by hand: rerun, then this script.
The committed results live in benchmarks/results/ (see benchmarks/results/README.md).
"""

from __future__ import annotations

import argparse
import json
import os


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("" if v is None else (format(v, fmt) if fmt else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule] + body)


def load(out: str, name: str):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_section(out_dir: str, command: str) -> list[str]:
    parts = [f"## Run: `{command}`", "", f"Results: `{os.path.relpath(out_dir)}`.", ""]
    fused = load(out_dir, "bench_fused.json")
    if fused:
        a = fused["args"]
        parts += [f"### End to end: `flex_prefill_attention` vs dense SDPA ({fused['device']})", "",
                  f"Structured inputs (`flexprefill.workloads`), B=1, Hq={a['heads']}, Hkv={a['kv_heads']}, "
                  f"D={a['head_dim']}, bf16, gamma={a['gamma']}, tau={a['tau']}, min_budget={a['min_budget']}, "
                  f"block {a['block_size']}. `graph ms`: the fused op replayed from a CUDA graph. `rel. error`: "
                  "relative L2 error of the output against dense attention. `x cuDNN` / `x flash`: their time "
                  "over ours (above 1 = we are faster). TFLOP/s over the computed blocks.", "",
                  table(fused["rows"], [("seqlen", "N", ""), ("density", "density", ".3f"), ("rel_err", "rel. error", ".4f"),
                                        ("query_aware", "QA heads", ".2f"), ("cudnn_ms", "cuDNN ms", ".2f"),
                                        ("flash_ms", "flash ms", ".2f"), ("fused_ms", "fused ms", ".2f"),
                                        ("graph_ms", "graph ms", ".2f"), ("select_ms", "select ms", ".3f"),
                                        ("attend_ms", "attend ms", ".2f"), ("speedup_vs_cudnn", "x cuDNN", ".2f"),
                                        ("speedup_vs_flash", "x flash", ".2f"), ("sparse_tflops", "TFLOP/s", ".0f")]),
                  ""]
    sel = load(out_dir, "bench_selection.json")
    if sel:
        clocks = ([("sm_clock_mhz_select", "MHz (select)", ""), ("sm_clock_mhz_dense", "MHz (dense)", "")]
                  if any(r.get("sm_clock_mhz_select") for r in sel["results"]) else [])
        parts += [f"### Selection alone: `select_blocks` as a share of dense cuDNN attention ({sel['device']})", "",
                  "B=1, Hq=32, Hkv=8, bf16, block 128, gamma 0.9, tau 0.1, min_budget 1024; structured and "
                  "Gaussian inputs. Targets: <= 15% at 8k, <= 2% from 32k; extra memory <= 64 MiB at 128k."
                  + (" MHz: the SM clock read right after the timing." if clocks else ""), "",
                  table(sel["results"], [("seqlen", "N", ""), ("head_dim", "D", ""), ("dense_cudnn_ms", "cuDNN ms", ".2f"),
                                         ("select_ms_structured", "select ms", ".3f"), ("share_structured", "share", ".2%"),
                                         ("select_ms_gaussian", "select ms (Gaussian)", ".3f"),
                                         ("share_gaussian", "share (Gaussian)", ".2%"),
                                         ("density_structured", "density", ".2f"),
                                         ("query_aware_heads_structured", "QA heads", ""),
                                         ("extra_memory_mib", "extra MiB", ".1f")] + clocks),
                  ""]
    attn = load(out_dir, "bench_attention.json")
    if attn:
        m = attn["meta"]
        parts += [f"### Sparse attention alone: `block_sparse_attention` ({m['device']})", "",
                  f"Random FlexPrefill-like selections (sink + diagonal + random causal blocks), B=1, "
                  f"Hq={m['heads_q']}, Hkv={m['heads_kv']}, bf16, block {m['block_size']}. TFLOP/s over "
                  f"{m['flops']}. `lin` = time / own density-1.0 time; `x` = our time / theirs (below 1 = we "
                  "are faster).", "",
                  table(attn["rows"], [("seqlen", "N", ""), ("head_dim", "D", ""), ("density", "density", ".3f"),
                                       ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ".0f"), ("linearity", "lin", ".3f"),
                                       ("vs_flash", "x flash", ".2f"), ("vs_cudnn", "x cuDNN", ".2f"),
                                       ("flex_ms", "flex ms", ".3f"), ("vs_flex", "x flex", ".2f")]),
                  ""]
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", nargs=2, action="append", metavar=("DIR", "COMMAND"), required=True)
    ap.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "BENCHMARKS.md"))
    args = ap.parse_args()
    parts = ["# Benchmarks", "", "Generated by `benchmarks/make_report.py` (see `benchmarks/results/README.md` for the",
             "exact invocation). Each section is one run on the device named in it; ratios never mix runs.", ""]
    for out_dir, command in args.run:
        parts += run_section(out_dir, command)
    with open(args.output, "w") as f:
        f.write("\n".join(parts))
    print(f"wrote {os.path.abspath(args.output)}")


if __name__ == "__main__":
    main()
