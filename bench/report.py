"""The README's generated sections, from JSON rows (every number traces to a row):
- "Results" (between results markers): the first H200 run's bench_e2e rows (a 4-layer schema);
- the MoE layer and MLA decode tables (between moe-layer and mla markers): bench_moe and bench_mla rows
  (bench/kernel_report.py);
- "The study" (between study markers): bench_e2e.study rows (bench/bench_e2e.py now), with the
  trace-simulator and live host-backend cache rows of bench_cache as the CPU evidence on trained models.

    python bench/report.py bench/results/bench_e2e.jsonl --plots bench/results --readme README.md
    python bench/report.py bench/results/study.jsonl --cache-rows bench/results/bench_cache-cpu.jsonl \
        --plots bench/results --readme README.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

START, END = "<!-- results:start -->", "<!-- results:end -->"
STUDY_START, STUDY_END = "<!-- study:start -->", "<!-- study:end -->"
POLICIES = ("on_demand", "lru", "predictive", "predictive+sched")


def load(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def e2e_rows(rows):
    """bench_e2e rows, the newest of each (model, mix, batch, provider, mode) when runs were appended."""
    latest = {}
    for r in rows:
        if r.get("benchmark") == "bench_e2e":
            latest[(r["model"], r["mix"], r["batch"], r["provider"], r["mode"])] = r
    return list(latest.values())


def budget_curves(rows, model, mode, batch, mix):
    """{policy: [(budget, decode tok/s)]} for one model/mode/batch/mix; 1.0 is the resident moecache row."""
    pick = [r for r in rows if (r["model"], r["mode"], r["batch"], r["mix"]) == (model, mode, batch, mix)]
    resident = next((r["decode_tok_s"] for r in pick if r["provider"] == "moecache"), None)
    curves = {}
    for policy in POLICIES:
        points = sorted((r["budget"], r["decode_tok_s"]) for r in pick
                        if r["provider"].startswith("offload") and r["provider"].split(":", 1)[1] == policy)
        if resident is not None:
            points.append((1.0, resident))
        if points:
            curves[policy] = points
    cpu = [r for r in pick if r["provider"] == "hf:cpu-offload"]
    if cpu:
        curves["hf cpu-offload (weights copied every call)"] = [(0.0, cpu[-1]["decode_tok_s"])]
    return curves


def plots(rows, outdir) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rows = e2e_rows(rows)
    written = []
    device = rows[0]["device"] if rows else "?"
    for model in sorted({r["model"] for r in rows if r["kind"] == "moe"}):
        for mode in sorted({r["mode"] for r in rows if r["model"] == model}):
            mix = sorted({r["mix"] for r in rows if r["model"] == model})[0]
            batch = min(r["batch"] for r in rows if r["model"] == model)
            curves = budget_curves(rows, model, mode, batch, mix)
            if not curves:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for policy, pts in curves.items():
                ax.plot([b * 100 for b, _ in pts], [t for _, t in pts], marker="o", label=policy)
            ax.set_xlabel("experts on the GPU (% of all)")
            ax.set_ylabel("decode tokens/s")
            ax.set_title(f"{model}, {mode}, batch {batch}, {mix} prompts\n{device}", fontsize=9)
            ax.legend(fontsize=8)
            path = outdir / f"e2e_budget_{model}_{mode}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    parts = ("attention", "experts", "stall", "predictor", "scheduler", "other")
    eager = [r for r in rows if r["mode"] == "eager" and r.get("breakdown_ms", {}).get("other") is not None]
    if eager:
        batch = min(r["batch"] for r in eager)
        mix = sorted({r["mix"] for r in eager})[0]
        bars = [r for r in eager if r["batch"] == batch and r["mix"] == mix]
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(bars)), 4.5))
        bottom = [0.0] * len(bars)
        for part in parts:
            values = [r["breakdown_ms"].get(part) or 0.0 for r in bars]
            ax.bar(range(len(bars)), values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xticks(range(len(bars)), [f"{r['model']}\n{r['provider']}" for r in bars], rotation=90, fontsize=6)
        ax.set_ylabel("ms per decode step (eager)")
        ax.set_title(f"step breakdown, batch {batch}, {mix} prompts, {device}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = outdir / "e2e_breakdown.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def markdown(rows) -> str:
    rows = e2e_rows(rows)
    if not rows:
        return "No bench_e2e rows yet.\n"
    devices = ", ".join(sorted({r["device"] for r in rows}))
    dates = ", ".join(sorted({r["date"][:10] for r in rows}))  # appended runs: each row is its own run's figure
    lines = [f"Measured on {devices}, {dates} (bench_e2e rows; `layers` built of `full_layers`; full-depth "
             "tokens/s = decode tokens/s x layers / full_layers, the whole step scaled, its fixed costs (lm_head, "
             "generate's host work) included: a lower bound).", "",
             "| model | mix | batch | provider | mode | prefill tok/s | decode tok/s | decode tok/s (full depth) "
             "| hit rate | PCIe-bound tok/s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        hit = f"{r['hit_rate']:.0%}" if r.get("hit_rate") is not None else ""
        bound = f"{r['pcie_bound_decode_tok_s']:.1f}" if r.get("pcie_bound_decode_tok_s") else ""
        lines.append(f"| {r['model']} | {r['mix']} | {r['batch']} | {r['provider']} | {r['mode']} | "
                     f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['decode_tok_s_full_depth']:.1f} | "
                     f"{hit} | {bound} |")
    lines += ["", "Equal GPU memory (weights + expert slots, scaled to full depth; approximate: the embeddings are "
              "scaled too), decode tokens/s at full depth, batch 1, first mix, per mode:", "",
              "| mode | model | provider | GPU GiB | decode tok/s |", "| --- | --- | --- | --- | --- |"]
    mix = sorted({r["mix"] for r in rows})[0]
    for mode in sorted({r["mode"] for r in rows}):
        pick = [r for r in rows if r["mode"] == mode and r["mix"] == mix and r["batch"] == min(x["batch"] for x in rows)
                and r.get("gpu_weight_bytes_full_depth")]
        for r in sorted(pick, key=lambda r: r["gpu_weight_bytes_full_depth"]):
            lines.append(f"| {mode} | {r['model']} | {r['provider']} | {r['gpu_weight_bytes_full_depth'] / 2**30:.2f} | "
                         f"{r['decode_tok_s_full_depth']:.1f} |")
    return "\n".join(lines) + "\n"


def update_readme(readme, text, start=START, end=END) -> None:
    path = Path(readme)
    content = path.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"{readme} has no {start} ... {end} block")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + start + "\n" + text + end + tail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows")
    parser.add_argument("--cache-rows", default=None, help="bench_cache rows (trace simulator, live CPU cache)")
    parser.add_argument("--plots", default=None, help="write PNG plots here")
    parser.add_argument("--readme", default=None, help="rewrite this file's generated block")
    args = parser.parse_args(argv)
    import study_report

    # The study's rows file does not exist before its first GPU slice; its section then shows the CPU rows.
    rows = load(args.rows) if Path(args.rows).exists() or not args.cache_rows else []
    kinds = {r.get("benchmark", "") for r in rows}
    if "bench_moe" in kinds or any(k.startswith("bench_mla") for k in kinds):
        import kernel_report

        if "bench_moe" in kinds:
            text, start, end = kernel_report.moe_markdown(rows), kernel_report.MOE_START, kernel_report.MOE_END
        else:
            text, start, end = kernel_report.mla_markdown(rows), kernel_report.MLA_START, kernel_report.MLA_END
    elif args.cache_rows or is_study(rows):
        cache_rows = load(args.cache_rows) if args.cache_rows else []
        if args.plots:
            draw(study_report.plots, rows, args.plots)
        text, start, end = study_report.markdown(rows, cache_rows), STUDY_START, STUDY_END
    else:
        if args.plots:
            draw(plots, rows, args.plots)
        text, start, end = markdown(rows), START, END
    if args.readme:
        update_readme(args.readme, text, start, end)
    else:
        print(text)
    return 0


STUDY_KINDS = ("bench_e2e.skipped", "bench_e2e.not_run")


def is_study(rows: list[dict]) -> bool:
    """Rows of the study (its own rows, or only its skipped / not-run records), not the Results' rows, which
    may hold a skipped configuration of their own beside their plain bench_e2e rows."""
    kinds = {r.get("benchmark", "") for r in rows}
    if any(k.startswith("bench_e2e.study") for k in kinds):
        return True
    return bool(kinds & set(STUDY_KINDS)) and "bench_e2e" not in kinds


def draw(make_plots, rows, outdir) -> None:
    """The plots where matplotlib is installed (it is optional: the tables come out without it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("report: matplotlib is not installed, no plots drawn (pip install matplotlib)", file=sys.stderr)
        return
    for p in make_plots(rows, outdir):
        print(p, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
