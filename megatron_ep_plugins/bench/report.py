"""Reporting: the markdown table rank 0 prints, ``NAME.json`` / ``NAME.md`` and the PNG plots (matplotlib,
the optional extra ``[bench]``): time per backend, GB/s, plugin/direct, and the token-sweep curves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def _header(report):
    m, v, s = report["machine"], report["versions"], report["sizes"]
    return (f"# ep_bench: {m['world_size']} x {m.get('gpu', 'CPU (gloo)')}, T={s['tokens_per_rank']} "
            f"H={s['hidden']} K={s['topk']} E={s['experts']} {'fp8' if s['fp8_dispatch'] else 'bf16'} dispatch\n\n"
            f"{m['platform']}; torch {v['torch']}, NCCL {v.get('nccl') or '-'}"
            f"{' (torch compiled with ' + v['nccl_compiled'] + ')' if v.get('nccl_compiled') else ''}, "
            f"deep_ep {v['deep_ep'] or '-'}, megatron-core {v['megatron_core'] or '-'}, "
            f"megatron_ep_plugins {v.get('megatron_ep_plugins') or '-'}; {report['time_utc']}; median of "
            f"{s['iters']} iterations after {s['warmup']} warm-up"
            f"{', paths alternating in ' + str(s['rounds']) + ' rounds' if s.get('rounds', 1) > 1 else ''}, slowest "
            "rank per iteration; "
            f"{_host_speed(report)}"
            "GB/s = received rows x hidden x element size / time.\n\n")


#: A rank whose pure-Python speed is this many times the fastest seen in the run is flagged (on the 2 x H200 VM about
#: a third of the vCPUs run at half speed at any moment, and which ones changes: ``benchmarks/gpu/host_speed.sh cores``).
SLOW_HOST_RATIO = 1.3


def _host_speed(report):
    """The header's part: every rank's host speed after the run, flagged like a row's."""
    speeds = report["machine"].get("host_python_us_per_rank")
    if not speeds:
        return ""
    slow = _slow(speeds, _fastest(report))
    flag = (f"**rank(s) {', '.join(slow)} ran on a slower CPU than the others**: host-bound rows (small T, `torch`) "
            "of this run are slower than the code is; " if slow else "")
    return ("host speed after the run (us per sum(range(200)), by rank; larger = slower host, host-bound numbers "
            "scale with it; each row's own is in its last column or notes) "
            + " / ".join(f"{v:.1f}" for v in speeds) + "; " + flag)


def _slow(speeds, fastest: float) -> list:
    """The ranks (as text) whose host speed, in us, is more than SLOW_HOST_RATIO times ``fastest``."""
    return [str(rank) for rank, v in enumerate(speeds) if v > SLOW_HOST_RATIO * fastest]


def _fastest(report) -> Optional[float]:
    """The fastest host speed seen anywhere in the run (every row's samples and the end-of-run one, all ranks): the
    machine's speed when nothing slows it, against which a row is flagged even when all its ranks were slow."""
    rows = [r for run in report.get("sweep", [report]) for r in run.get("results", [])]
    seen = [v for r in [report["machine"], *rows] for v in (r.get("host_python_us_per_rank") or [])]
    return min(seen) if seen else None


def _row_host(r, fastest: Optional[float]) -> str:
    """Host speeds by rank (a row's: the slower of the samples around its timings), each rank more than
    SLOW_HOST_RATIO times ``fastest`` named as slow; "-" when not recorded."""
    speeds = r.get("host_python_us_per_rank")
    if not speeds:
        return "-"
    slow = _slow(speeds, fastest)
    return " / ".join(f"{v:.1f}" for v in speeds) + (f" (rank {', '.join(slow)} slow)" if slow else "")


def _us(r, path, op):
    return r.get(path, {}).get(op, {}).get("median_us")


def _conformance(r):
    c = r["conformance"]
    return "pass" if c["passed"] else "FAIL: " + ", ".join(k for k, x in c["checks"].items() if not x["ok"])


def _autograd(r):
    """The training path (inputs require grad, so both sides run their autograd Functions): plugin d+c us, then
    Megatron's when measured, then plugin/direct on that path."""
    if "plugin_autograd" not in r:
        return "-"
    p = _us(r, "plugin_autograd", "dispatch") + _us(r, "plugin_autograd", "combine")
    text = _f(p)
    if "megatron_autograd" in r:
        text += " / " + _f(_us(r, "megatron_autograd", "dispatch") + _us(r, "megatron_autograd", "combine"))
    if "plugin_autograd_over_direct" in r:
        text += f" (plugin/direct {r['plugin_autograd_over_direct']:.3f})"
    return text


def markdown(report):
    cols = ["backend", "status", "conformance", "dispatch us", "combine us", "dispatch GB/s", "combine GB/s",
            "direct dispatch us", "direct combine us", "plugin/direct", "megatron dispatch us",
            "megatron combine us", "plugin-megatron us (d / c)", "with autograd: plugin / megatron d+c us",
            "vs torch", "notes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    fastest = _fastest(report)
    for r in report["results"] if "sweep" not in report else []:
        if r["status"] != "ok":
            why = r.get("reason") or r.get("error", "")
            lines.append(f"| {r['backend']} | {r['status']} |" + " - |" * (len(cols) - 3)
                         + f" {why.replace('|', '/')} |")
            continue
        ck = r["conformance"]["checks"]
        errs = [f"combine err {ck['combine']['rel_err']:.1e}"]
        for g in ("x_grad", "probs_grad"):
            if g in ck and ck[g].get("rel_err") is not None:
                errs.append(f"{g} err {ck[g]['rel_err']:.1e}")
        notes = "; ".join(errs)
        if "plugin_over_direct_counts" in r:
            notes += (f"; direct+count exchange {_f(_us(r, 'direct_counts', 'dispatch'))} / "
                      f"{_f(_us(r, 'direct_counts', 'combine'))} us, plugin/that {r['plugin_over_direct_counts']:.3f}")
        if "elastic_over_legacy" in r:
            notes += f"; elastic/legacy {r['elastic_over_legacy']:.2f}x"
            if "elastic_over_legacy_direct" in r:
                notes += f" (direct {r['elastic_over_legacy_direct']:.2f}x)"
        if r.get("host_python_us_per_rank"):
            notes += f"; host us by rank {_row_host(r, fastest)}"
        if r.get("megatron_have_deep_ep") is False:
            notes += "; stock Megatron reports HAVE_DEEP_EP=False with this DeepEP (filled in for the measurement)"
        p = r["plugin"]
        pm = "-"
        if "plugin_minus_megatron_dispatch_us" in r:
            pm = f"{r['plugin_minus_megatron_dispatch_us']:+.1f} / {r['plugin_minus_megatron_combine_us']:+.1f}"
        lines.append("| " + " | ".join([
            r["backend"], "ok", _conformance(r),
            _f(p["dispatch"]["median_us"]), _f(p["combine"]["median_us"]),
            _f(p["dispatch"].get("gbps"), "{:.3g}"), _f(p["combine"].get("gbps"), "{:.3g}"),
            _f(_us(r, "direct", "dispatch")), _f(_us(r, "direct", "combine")),
            _f(r.get("plugin_over_direct"), "{:.3f}"),
            _f(_us(r, "megatron", "dispatch")), _f(_us(r, "megatron", "combine")), pm, _autograd(r),
            _f(r.get("speedup_vs_torch"), "{:.2f}x"), notes]) + " |")
    if "sweep" in report:
        lines = sweep_markdown(report)
    return _header(report) + "\n".join(lines) + "\n"


def sweep_markdown(report):
    cols = ["backend", "tokens/rank", "conformance", "dispatch us", "combine us", "direct d+c us", "plugin/direct",
            "megatron d+c us", "plugin-megatron us (d / c)", "with autograd: plugin / megatron d+c us",
            "us per 1k tokens (plugin d+c)", "host us by rank"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    rows = sorted((r for run in report["sweep"] for r in run["results"]),
                  key=lambda r: (r["backend"], r["tokens_per_rank"]))
    fastest = _fastest(report)
    for r in rows:
        if r["status"] != "ok":
            why = (r.get("reason") or r.get("error", "")).replace("|", "/")
            lines.append(f"| {r['backend']} | {r['tokens_per_rank']} | {r['status']}: {why} |" + " - |" * (len(cols) - 3))
            continue
        p = _us(r, "plugin", "dispatch") + _us(r, "plugin", "combine")
        d = (_us(r, "direct", "dispatch") or 0) + (_us(r, "direct", "combine") or 0) if "direct" in r else None
        m = _us(r, "megatron", "dispatch") + _us(r, "megatron", "combine") if "megatron" in r else None
        pm = "-"
        if "plugin_minus_megatron_dispatch_us" in r:
            pm = f"{r['plugin_minus_megatron_dispatch_us']:+.1f} / {r['plugin_minus_megatron_combine_us']:+.1f}"
        per_k = p / r["tokens_per_rank"] * 1000 if r["tokens_per_rank"] else None
        lines.append("| " + " | ".join([
            r["backend"], str(r["tokens_per_rank"]), _conformance(r), _f(_us(r, "plugin", "dispatch")),
            _f(_us(r, "plugin", "combine")), _f(d), _f(r.get("plugin_over_direct"), "{:.3f}"), _f(m), pm,
            _autograd(r), _f(per_k), _row_host(r, fastest)]) + " |")
    return lines


def write_report(report, args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    print(text, flush=True)
    stem = out / args.name
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(text)
    png = plot(report, stem.with_suffix(".png")) if args.plot else None
    print(f"ep_bench: wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}"
          + (f" and {png}" if png else ""), flush=True)


def plot(report, path):
    """PNG (matplotlib, the ``[bench]`` extra). One size: time per backend (dispatch / combine, through the plugin,
    DeepEP directly and Megatron's own path), GB/s, and plugin/direct. Token sweep: the same three against
    tokens per rank (log scale). Returns the path written, or ``None``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - optional extra: say so, keep the JSON/markdown
        print("ep_bench: matplotlib not importable, no plot written (pip install 'megatron-ep-plugins[bench]')",
              flush=True)
        return None
    title = _header(report).splitlines()[0].lstrip("# ")
    fig, (ax_t, ax_g, ax_r) = plt.subplots(1, 3, figsize=(15, 4.2))
    if "sweep" in report:
        series = {}
        for run in report["sweep"]:
            for r in run["results"]:
                if r["status"] == "ok":
                    series.setdefault(r["backend"], []).append(r)
        for name, rs in sorted(series.items()):
            ts = [r["tokens_per_rank"] for r in rs]
            for kind, style, label in (("plugin", "o-", ""), ("direct", "x--", " direct"),
                                       ("megatron", "s:", " Megatron's path")):
                if all(kind in r for r in rs):
                    ax_t.plot(ts, [_us(r, kind, "dispatch") + _us(r, kind, "combine") for r in rs], style,
                              label=name + label)
            for op, style in (("dispatch", "o-"), ("combine", "^--")):
                gbps = [r["plugin"][op].get("gbps") for r in rs]
                if all(g is not None for g in gbps):
                    ax_g.plot(ts, gbps, style, label=f"{name} {op}")
            if all("plugin_over_direct" in r for r in rs):
                ax_r.plot(ts, [r["plugin_over_direct"] for r in rs], "o-", label=name)
        for a in (ax_t, ax_g, ax_r):
            a.set_xscale("log", base=2)
            a.set_xlabel("tokens per rank")
        ax_t.set_yscale("log")
        ax_t.set_ylabel("dispatch + combine, median us")
        ax_g.set_ylabel("GB/s through the plugin")
    else:
        ok = [r for r in report["results"] if r["status"] == "ok"]
        if not ok:
            plt.close(fig)
            return None
        bars = [(r["backend"] + label, _us(r, kind, "dispatch"), _us(r, kind, "combine"))
                for r in ok for kind, label in (("plugin", ""), ("direct", " direct"), ("megatron", " Megatron"))
                if kind in r]
        xs = range(len(bars))
        ax_t.bar([i - 0.2 for i in xs], [b[1] for b in bars], width=0.4, label="dispatch")
        ax_t.bar([i + 0.2 for i in xs], [b[2] for b in bars], width=0.4, label="combine")
        ax_t.set_xticks(list(xs), [b[0] for b in bars], rotation=25, ha="right")
        ax_t.set_ylabel("median us (lower is better)")
        gb = [(r["backend"] + label, r[kind]["dispatch"].get("gbps") or 0, r[kind]["combine"].get("gbps") or 0)
              for r in ok for kind, label in (("plugin", ""), ("direct", " direct")) if kind in r]
        xs = range(len(gb))
        ax_g.bar([i - 0.2 for i in xs], [b[1] for b in gb], width=0.4, label="dispatch")
        ax_g.bar([i + 0.2 for i in xs], [b[2] for b in gb], width=0.4, label="combine")
        ax_g.set_xticks(list(xs), [b[0] for b in gb], rotation=25, ha="right")
        ax_g.set_ylabel("GB/s (higher is better)")
        ratios = [(r["backend"], r["plugin_over_direct"]) for r in ok if "plugin_over_direct" in r]
        if ratios:
            ax_r.bar(range(len(ratios)), [v for _, v in ratios], color="tab:green")
            ax_r.set_xticks(list(range(len(ratios))), [n for n, _ in ratios], rotation=25, ha="right")
        else:
            ax_r.text(0.5, 0.5, "no direct measurement\n(--direct on, or a GPU run)", ha="center", va="center",
                      transform=ax_r.transAxes)
    ax_r.axhline(0.97, color="grey", lw=0.8, ls="--")
    ax_r.set_ylabel("plugin/direct throughput (1 = no overhead)")
    ax_t.set_title("time per backend", fontsize=9)
    ax_g.set_title("bandwidth", fontsize=9)
    ax_r.set_title("plugin / direct", fontsize=9)
    for a in (ax_t, ax_g, ax_r):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
