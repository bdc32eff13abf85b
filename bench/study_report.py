"""The README's study section and plots, generated from bench_e2e.study rows (bench/bench_e2e.py) and the
bench_cache rows of the trained models (trace simulator and live host-backend cache). Used by report.py.

Tokens/s come only from rows measured on a GPU; rows of a CPU --quick run (scaled-down models) make the
same tables under a heading that says they answer nothing.
"""
from __future__ import annotations

from pathlib import Path

KEY = ("model", "routing", "mix", "batch", "new_tokens", "provider", "mode")


def latest(rows, benchmark="bench_e2e.study"):
    """The newest row of each configuration (runs append)."""
    out = {}
    for r in rows:
        if r.get("benchmark") == benchmark:
            out[tuple(r.get(k) for k in KEY)] = r
    return list(out.values())


def _f(x, spec=".1f", none=""):
    return none if x is None else format(x, spec)


def _pct(x):
    return "" if x is None else f"{x:.0%}"


def _delta(a, b):
    """a relative to b, signed percent."""
    return None if not a or not b else (a / b - 1) * 100


def _pick(rows, **want):
    return [r for r in rows if all(r.get(k) == v for k, v in want.items())]


def _one(rows, **want):
    found = _pick(rows, **want)
    return found[0] if found else None


def headline_config(rows):
    """(mix, batch, new_tokens, routing preference) the headline table uses: the most common values."""
    def common(key):
        values = [r[key] for r in rows]
        return max(sorted(set(values), key=str), key=values.count) if values else None
    return common("batch"), common("new_tokens")


def answer_sentences(rows) -> list[str]:
    """The answer, one sentence per measured comparison, each naming the rows it comes from."""
    out = []
    for model in sorted({r["model"] for r in rows if r["kind"] == "moe"}):
        for (mix, B, new, routing) in sorted({(r["mix"], r["batch"], r["new_tokens"], r["routing"])
                                               for r in rows if r["model"] == model}, key=str):
            pick = _pick(rows, model=model, mix=mix, batch=B, new_tokens=new, routing=routing, mode="eager")
            by = {r["provider"]: r for r in pick}
            where = f"{model}, {routing}, {mix}, B={B}, {new} new tokens"
            for budget in sorted({r["provider"].split(":")[0] for r in pick if r["provider"].startswith("offload")}):
                base, only = by.get(f"{budget}:on-demand"), by.get(f"{budget}:predict-only")
                pred = by.get(f"{budget}:predictive")
                if base and only and only.get("breakdown_ms"):
                    b = only["breakdown_ms"]
                    out.append(f"{where}, {budget}: predicting without prefetching costs {b['predictor_host']:.3f} ms "
                               f"host / {b['predictor_gpu']:.3f} ms device time per decode step "
                               f"({b['predictor_host'] / (1e3 * B / only['decode_tok_s']) * 100:.1f}% of the step); "
                               f"decode {only['decode_tok_s']:.1f} vs {base['decode_tok_s']:.1f} tok/s on demand "
                               f"({_delta(only['decode_tok_s'], base['decode_tok_s']):+.1f}%).")
                if base and pred:
                    out.append(f"{where}, {budget}: predicting and prefetching: decode {pred['decode_tok_s']:.1f} vs "
                               f"{base['decode_tok_s']:.1f} tok/s on demand "
                               f"({_delta(pred['decode_tok_s'], base['decode_tok_s']):+.1f}%), experts moved per token "
                               f"{_f(pred.get('experts_moved_per_token'), '.2f')} vs "
                               f"{_f(base.get('experts_moved_per_token'), '.2f')}, decode hit rate "
                               f"{_pct(pred.get('decode_hit_rate'))} vs {_pct(base.get('decode_hit_rate'))}.")
                ordered, sched = by.get(f"{budget}:in-order"), by.get(f"{budget}:scheduled")
                if ordered and sched:
                    out.append(f"{where}, {budget}: scheduling micro-batches of {B // 2} by predicted routes costs "
                               f"{sched['scheduler_ms']:.1f} ms per batch of requests; end-to-end "
                               f"{sched['e2e_tok_s_per_request']:.2f} vs {ordered['e2e_tok_s_per_request']:.2f} tok/s "
                               f"per request in order ({_delta(sched['e2e_tok_s_per_request'], ordered['e2e_tok_s_per_request']):+.1f}%), "
                               f"decode hit rate {_pct(sched.get('decode_hit_rate'))} vs {_pct(ordered.get('decode_hit_rate'))}.")
    dense = {(r["model"], r["mix"], r["batch"], r["new_tokens"]): r for r in rows
             if r["kind"] == "dense" and r["provider"] == "hf:eager" and r["mode"] == "eager"}
    for (model, mix, B, new), d in sorted(dense.items(), key=str):
        moe = [r for r in rows if r["kind"] == "moe" and (r["mix"], r["batch"], r["new_tokens"], r["mode"]) ==
               (mix, B, new, "eager")]
        for m in sorted({r["model"] for r in moe}):
            best = max((r for r in moe if r["model"] == m and r["provider"].startswith("offload")),
                       key=lambda r: r["e2e_tok_s_per_request"], default=None)
            resident = next((r for r in moe if r["model"] == m and r["provider"] == "moecache"), None)
            if best and resident:
                out.append(f"{mix}, B={B}, {new} new tokens: {m} end-to-end {resident['e2e_tok_s_per_request']:.2f} "
                           f"tok/s per request with its experts resident, {best['e2e_tok_s_per_request']:.2f} offloaded "
                           f"({best['provider']}, {best['routing']}), against {model} "
                           f"{d['e2e_tok_s_per_request']:.2f}.")
    return out


def floor(r) -> str:
    """Decode tok/s as a share of the HBM floor (weights read once per token at the measured read rate)."""
    if r.get("frac_hbm_floor") is None:
        return ""
    return f"{r['frac_hbm_floor']:.0%} of {r['hbm_floor_tok_s']:.0f}"


def table(rows) -> list[str]:
    lines = ["| model | routing | mix | B | new | provider | mode | cache | encode ms | prefill tok/s | decode tok/s "
             "| share of HBM floor (B=1) | e2e tok/s per request | decode hit rate | experts moved / token "
             "| PCIe-bound decode tok/s | predictor ms/step (host / device) | scheduler ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- |"]
    for r in sorted(rows, key=lambda r: tuple(str(r.get(k)) for k in KEY)):
        b = r.get("breakdown_ms") or {}
        pred = f"{b['predictor_host']:.3f} / {b['predictor_gpu']:.3f}" if b.get("predictor_host") else ""
        lines.append(f"| {r['model']} | {r['routing']} | {r['mix']} | {r['batch']} | {r['new_tokens']} | {r['provider']} "
                     f"| {r['mode']} | {r.get('cache') or ''} | {r['encode_ms']:.1f} | {r['prefill_tok_s']:.1f} "
                     f"| {r['decode_tok_s']:.1f} | {floor(r)} | {r['e2e_tok_s_per_request']:.2f} "
                     f"| {_pct(r.get('decode_hit_rate'))} "
                     f"| {_f(r.get('experts_moved_per_token'), '.2f')} | {_f(r.get('pcie_bound_decode_tok_s'))} "
                     f"| {pred} | {_f(r.get('scheduler_ms') or None)} |")
    return lines


CACHE_POLICIES = ("on_demand", "lru", "lfu", "predictive-d1", "learned-d1", "pred-d2+sched", "learned-d2+sched",
                  "budgeted-d2", "learned-budgeted-d2", "belady")


def cache_table(cache_rows) -> list[str]:
    """Trace-simulator rows of the trained models at 25% and 50% budgets, over the decode steps (every
    micro-batch's prompt step left out): hit rate, experts moved and exposed stall per decoded token under
    the rows' timing model (its assumptions are columns)."""
    trace = [r for r in cache_rows if r.get("benchmark") == "bench_cache.trace" and r.get("budget") in (0.25, 0.5)
             and r.get("provider") in CACHE_POLICIES]
    if not trace:
        return []
    lines = ["| model | timing model (assumed) | budget | policy | decode hit rate | experts moved per decoded token "
             "| exposed stall ms per decoded token |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in trace:
        timing = (f"{r['layer_ms']} ms/layer, {r['expert_bytes'] / 1e6:.1f} MB experts at {r['h2d_gbps']} GB/s"
                  if r.get("layer_ms") else "")
        lines.append(f"| {r['model']} | {timing} | {r['budget']:.0%} | {r['provider']} | {_pct(r['decode_hit_rate'])} | "
                     f"{r['loads_per_token']:.2f} | {_f(r.get('stall_ms_per_token'), '.2f')} |")
    return lines


def markdown(rows, cache_rows=()) -> str:
    study = latest(rows)
    skipped = [r for r in rows if r.get("benchmark") == "bench_e2e.skipped"]
    not_run = [r for r in rows if r.get("benchmark") == "bench_e2e.not_run"]
    gpu = [r for r in study if not r.get("quick") and not str(r.get("device", "")).lower().startswith("cpu")]
    cpu = [r for r in study if r not in gpu]
    lines = []
    if gpu:
        devices = sorted({r["device"] for r in gpu})
        dates = sorted({r["date"][:10] for r in gpu})
        lines += [f"Measured on {', '.join(devices)} ({', '.join(dates)}), {len(gpu)} configurations; each sentence "
                  "names the rows (model, routing, mix, batch, new tokens, provider) it comes from.", ""]
        lines += [f"- {s}" for s in answer_sentences(gpu)] + [""]
        lines += table(gpu) + [""]
    else:
        lines += ["Tokens/s: not measured on a GPU yet (the GPU slices are `bash bench/gpu_study.sh 1` .. `4`; "
                  "see \"The study on a GPU\"). Hit rates and bytes moved on trained models come from the CPU rows "
                  "below.", ""]
    if cache_rows:
        ct = cache_table(cache_rows)
        if ct:
            dev = sorted({r.get("device", "?") for r in cache_rows})
            lines += [f"Trace simulator on the trained models' routing ({', '.join(dev)}; bench_cache.trace rows):", ""]
            lines += ct + [""]
    if cpu:
        lines += [f"CPU smoke run (`--quick`, scaled-down models, {len(cpu)} configurations on "
                  f"{', '.join(sorted({r['device'] for r in cpu}))}): it shows every axis runs; its tokens/s answer "
                  "nothing.", ""]
        lines += [f"- {s}" for s in answer_sentences(cpu)] + [""]
    if skipped:
        lines += ["Skipped configurations (each a failure of that configuration, with its reason):", ""]
        lines += [f"- {r.get('model')} {r.get('routing', '')} {r.get('mix', '')} B={r.get('batch', '')} "
                  f"{r.get('provider', '')} {r.get('mode', '')}: {r['reason']}" for r in skipped] + [""]
    if not_run:
        lines += [f"Not run (the slice's deadline passed first): {len(not_run)} configurations.", ""]
    return "\n".join(lines)


def plots(rows, outdir) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    study = latest(rows)
    written = []
    if not study:
        return written
    B, new = headline_config(study)
    device = sorted({r["device"] for r in study})[0]
    for mix in sorted({r["mix"] for r in study}):
        pick = [r for r in study if (r["mix"], r["batch"], r["new_tokens"], r["mode"]) == (mix, B, new, "eager")]
        if not pick:
            continue
        pick.sort(key=lambda r: (r["model"], r["routing"], r["provider"]))
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(pick)), 4.5))
        ax.bar(range(len(pick)), [r["e2e_tok_s_per_request"] for r in pick])
        ax.set_xticks(range(len(pick)), [f"{r['model']} {r['routing'][:8]}\n{r['provider']}" for r in pick],
                      rotation=90, fontsize=6)
        ax.set_ylabel("end-to-end tokens/s per request")
        ax.set_title(f"{mix}, batch {B}, {new} new tokens, eager; {device}", fontsize=9)
        fig.tight_layout()
        path = outdir / f"study_e2e_{mix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    parts = ("attention", "experts", "predictor_host", "scheduler", "other")  # experts drawn without the predictor
    bars = [r for r in study if r.get("breakdown_ms") and (r["batch"], r["new_tokens"]) == (B, new)]
    if bars:
        mix = sorted({r["mix"] for r in bars})[0]
        bars = sorted((r for r in bars if r["mix"] == mix), key=lambda r: (r["model"], r["routing"], r["provider"]))
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(bars)), 4.5))
        bottom = [0.0] * len(bars)
        for part in parts:
            values = [r["breakdown_ms"].get(part) or 0.0 for r in bars]
            if part == "experts":
                values = [max(v - (r["breakdown_ms"].get("predictor_host") or 0.0), 0.0) for v, r in zip(values, bars)]
            ax.bar(range(len(bars)), values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xticks(range(len(bars)), [f"{r['model']} {r['routing'][:8]}\n{r['provider']}" for r in bars],
                      rotation=90, fontsize=6)
        ax.set_ylabel("ms per decode step (eager)")
        ax.set_title(f"decode step breakdown, {mix}, batch {B}, {new} new tokens; {device}\n"
                     "(the predictor's host time is drawn out of the experts' span)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = outdir / "study_breakdown.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
