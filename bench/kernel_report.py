"""The README's kernel tables, from JSON rows (every number traces to a row): the MoE layer against
grouped_mm (bench_moe rows) and MLA decode against the absorbed torch version and transformers
(bench_mla rows). When runs were appended, each point shows the newest run that measured moecache there,
every provider from that run (a ratio never pairs rows of different runs).

    python bench/report.py bench/results/bench_moe.jsonl --readme README.md
    python bench/report.py bench/results/bench_mla.jsonl --readme README.md
"""
from __future__ import annotations

import json

MOE_START, MOE_END = "<!-- moe-layer:start -->", "<!-- moe-layer:end -->"
MLA_START, MLA_END = "<!-- mla:start -->", "<!-- mla:end -->"
SHAPE_NAMES = {"deepseek-v2-lite/vl2-small": "V2-Lite/VL2-Small", "mixtral-8x7b": "Mixtral-8x7B",
               "qwen3-30b-a3b": "Qwen3-30B-A3B", "vl2-base": "VL2-base"}
COMPUTE_BOUND_TOKENS = 1024  # from here on a point's figure is TFLOP/s against the matmul ceiling


def _run(row: dict):
    """Rows written before runs carried an id: one process measured its ceilings once, so they mark its rows."""
    return row.get("run") or (row.get("device"), row.get("commit"), json.dumps(row.get("ceilings"), sort_keys=True))


def _newest_run_of_each_point(rows, point_of, provider_of, is_ours, has_value) -> dict:
    """{point + (provider,): row} from the newest run that measured moecache at that point (a later row of the
    same run and provider replaces an earlier one unless it holds no figure)."""
    run_of_point = {}
    for r in rows:
        if is_ours(r):
            run_of_point[point_of(r)] = _run(r)
    chosen = {}
    for r in rows:
        point = point_of(r)
        key = point + (provider_of(r),)
        if point in run_of_point and _run(r) == run_of_point[point] and (has_value(r) or key not in chosen):
            chosen[key] = r
    return chosen


def _ms(value) -> str:
    return "" if value is None else f"{value:.3f}" if value < 10 else f"{value:.2f}"


def _ratio(baseline, ours) -> str:
    return "" if baseline is None or ours is None else f"{baseline['ms'] / ours['ms']:.2f}x"


def _provenance(rows) -> str:
    devices = sorted({r.get("device", "?") for r in rows})
    dates = sorted({r.get("date", "?")[:10] for r in rows})
    return f"Rows measured on {', '.join(devices)}, {', '.join(dates)}."


def moe_markdown(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("benchmark") == "bench_moe"]
    order = list(dict.fromkeys((r["shape"]["name"], r["shape"]["T"]) for r in rows))
    latest = _newest_run_of_each_point(rows, lambda r: (r["shape"]["name"], r["shape"]["T"]),
                                       lambda r: r["provider"],
                                       lambda r: r["provider"].startswith("moecache") and r.get("ms") is not None,
                                       lambda r: r.get("ms") is not None)
    shapes = list(dict.fromkeys(name for name, _ in order))
    points = sorted(order, key=lambda p: (shapes.index(p[0]), p[1]))
    lines = [_provenance(latest.values()), "",
             "| shape | T | experts | moecache graph ms | HBM read | grouped_mm graph ms | x | moecache eager ms | "
             "grouped_mm eager ms | x | HF loop ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, T in points:
        get = {p: latest.get((name, T, p)) for p in ("moecache:graph", "grouped_mm:graph", "moecache:eager",
                                                      "grouped_mm:eager", "hf_loop:eager")}
        ours_graph, ours_eager = get["moecache:graph"], get["moecache:eager"]
        any_row = next((r for r in get.values() if r is not None), None)
        if any_row is None:  # only providers this table has no column for
            continue
        if ours_graph is not None and ours_graph.get("frac_hbm_read") is not None:
            figure = f"{ours_graph['frac_hbm_read']:.0%}"
        elif ours_eager is not None and T >= COMPUTE_BOUND_TOKENS and ours_eager.get("frac_matmul") is not None:
            figure = f"{ours_eager['tflops']:.0f} TFLOP/s, {ours_eager['frac_matmul']:.0%} of matmul"
        elif ours_eager is not None and ours_eager.get("frac_hbm_read") is not None:
            figure = f"{ours_eager['frac_hbm_read']:.0%} (eager)"
        else:
            figure = ""
        cells = [SHAPE_NAMES.get(name, name), str(T), str(any_row["shape"].get("experts_touched", "")),
                 _ms(ours_graph and ours_graph["ms"]), figure, _ms(get["grouped_mm:graph"] and get["grouped_mm:graph"]["ms"]),
                 _ratio(get["grouped_mm:graph"], ours_graph), _ms(ours_eager and ours_eager["ms"]),
                 _ms(get["grouped_mm:eager"] and get["grouped_mm:eager"]["ms"]), _ratio(get["grouped_mm:eager"], ours_eager),
                 _ms(get["hf_loop:eager"] and get["hf_loop:eager"]["ms"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mla_markdown(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("benchmark", "").startswith("bench_mla")]
    order = list(dict.fromkeys((r["Hq"], r["B"], r["S"]) for r in rows))
    latest = _newest_run_of_each_point(rows, lambda r: (r["Hq"], r["B"], r["S"]), lambda r: r["method"],
                                       lambda r: r["method"] == "moecache" and r.get("us") is not None,
                                       lambda r: r.get("us") is not None or bool(r.get("skipped")))
    lines = [_provenance(latest.values()), "",
             "| heads | B | S | moecache us | GB/s | HBM read | absorbed torch us | x | transformers us | x |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for Hq, B, S in sorted(order, key=lambda p: (p[1], p[2], p[0])):
        ours, absorbed, hf = (latest.get((Hq, B, S, m)) for m in ("moecache", "torch_absorbed", "transformers"))
        if ours is None or ours.get("us") is None:
            continue
        hf_cell = (f"{hf['us']:.1f}" if hf is not None and hf.get("us") is not None else
                   f"({hf['skipped'].split(' (')[0]})" if hf is not None and hf.get("skipped") else "")
        lines.append("| " + " | ".join([
            str(Hq), str(B), str(S), f"{ours['us']:.1f}", f"{ours['gbps']:.0f}",
            f"{ours['frac_hbm_read']:.0%}" if ours.get("frac_hbm_read") is not None else "",
            f"{absorbed['us']:.1f}" if absorbed is not None and absorbed.get("us") is not None else "",
            f"{ours['speedup_vs_torch_absorbed']:.2f}x" if ours.get("speedup_vs_torch_absorbed") else "",
            hf_cell, f"{ours['speedup_vs_transformers']:.1f}x" if ours.get("speedup_vs_transformers") else ""]) + " |")
    return "\n".join(lines) + "\n"
