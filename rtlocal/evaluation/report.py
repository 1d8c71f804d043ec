"""The eval report: the analysis of per-prompt records assembled into report.json, report.md and plots."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rtlocal.constants import alias_of
from rtlocal.errors import RtlocalError
from rtlocal.evaluation.analysis import (
    CONTROL_OFF_TARGET_MAX,
    CONTROL_ON_TARGET_MAX,
    SWEEP_GRID,
    category_curves,
    confusion,
    control_check,
    examples,
    global_sweep,
    operating_point,
    outcomes,
    per_category,
    refused_under,
    roc_points,
    summary,
)
from rtlocal.evaluation.data import FIRST_TOKEN, GENERATE, EvalItem, Record
from rtlocal.evaluation.metrics import DEFAULT_BOOTSTRAP
from rtlocal.paths import atomic_write_bytes, atomic_write_text
from rtlocal.runtime.policy import Policy

log = logging.getLogger(__name__)

REPORT_SCHEMA = 1


def build_report(
    records: Sequence[Record],
    *,
    items: Sequence[EvalItem],
    policy: Policy,
    model: Mapping[str, Any],
    data: Mapping[str, Any],
    mode: str,
    judge: Mapping[str, Any] | None = None,
    timing: Mapping[str, Any] | None = None,
    presets: Mapping[str, Policy] | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    control: bool = True,
    label: str | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict (report.json); `render_markdown` and `write_plots` read it.

    `label` names the run in comparisons (default: model file and mode).
    """
    if not records:
        raise RtlocalError("no results to report (every prompt was skipped)")
    categories = list(model.get("categories") or [])
    o = outcomes(records, policy, categories, mode)
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "label": label or f"{model['name']} ({mode})",
        "model": dict(model),
        "data": dict(data),
        "mode": mode,
        "policy": {"thresholds": dict(policy.thresholds), "describe": _describe(policy) if categories else "none (no refusal tokens)"},
        "judge": dict(judge) if judge else None,
        "n": len(records),
        "summary": summary(o, n_boot=n_boot),
        "per_category": per_category(o, n_boot=n_boot),
        "confusion": confusion(o),
        "refusals_by_label": dict(Counter(p for p in o.predicted if p is not None)),
        "roc": roc_points(o),
        "timing": dict(timing or {}),
        "examples": examples(o, records, {it.key: it for it in items}),
    }
    if o.probs is not None:
        label = "first-token decisions" if mode == FIRST_TOKEN else "first-token decisions (the refusal tokens of the generate run)"
        report["sweeps"] = {
            "basis": label,
            "global": global_sweep(records, policy, categories, o.should_refuse),
            "per_category": category_curves(o),
        }
        if control:
            report["control"] = {
                "basis": label,
                "on_target_max": CONTROL_ON_TARGET_MAX,
                "off_target_max": CONTROL_OFF_TARGET_MAX,
                "rows": control_check(records, policy, categories),
            }
        if presets:
            report["presets"] = {
                name: {**operating_point(refused_under(records, p), o.should_refuse), "thresholds": dict(p.thresholds)}
                for name, p in presets.items()
            }
    if mode == GENERATE:
        report["judge_rules_fired"] = dict(Counter(r.judge_reason for r in records if r.judge_refused))
        report["stop_reasons"] = dict(Counter(r.stop_reason for r in records))
        if o.probs is not None:
            token = np.array([r.token_category is not None for r in records], bool)
            report["token_vs_judge"] = {
                "token_refused": int(token.sum()),
                "judge_refused": int(sum(bool(r.judge_refused) for r in records)),
                "both": int(sum(bool(r.judge_refused) and t for r, t in zip(records, token))),
            }
    return report


def _describe(policy: Policy) -> str:
    """Thresholds to three significant digits (policy.describe rounds to two decimals)."""
    return " · ".join(f"{alias_of(c)} {'off' if t is None or t >= 1 else f'{t:.3g}'}" for c, t in policy.thresholds.items())


def load_report(path: Path) -> dict[str, Any]:
    """A report.json from another run (for --compare): the file, or the folder that holds it."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RtlocalError(f"{path}: no report.json (run `rtlocal eval ... --out {path}` first)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise RtlocalError(f"{p}: not a readable report ({e})") from None
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        raise RtlocalError(f"{p}: not an rtlocal eval report (schema {REPORT_SCHEMA})")
    return report


# ------------------------------------------------------------------ Markdown


def pct(x: float | None, ci: Sequence[float] | None = None) -> str:
    """A rate as a percentage, with its interval when given."""
    if x is None:
        return "n/a"
    s = f"{100 * x:.1f}%"
    return f"{s} [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]" if ci else s


def num(x: float | None, ci: Sequence[float] | None = None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f} [{ci[0]:.3f}–{ci[1]:.3f}]" if ci else f"{x:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def render_markdown(report: Mapping[str, Any], compare: Sequence[Mapping[str, Any]] = ()) -> str:
    """report.md: summary, per category, confusion, control check, sweeps, comparison and plots."""
    s, d, m = report["summary"], report["data"], report["model"]
    ci = s["ci95"]
    lines = [
        f"# rtlocal eval: {report['label']}",
        "",
        f"- model: `{m['path']}` ({'refusal tokens: ' + ', '.join(alias_of(c) for c in m['categories']) if m.get('categories') else 'no refusal tokens'}"
        f"{', calibrated' if m.get('calibration') else ''})",
        f"- data: `{d['spec']}` ({d['kind']}; {', '.join(d['splits'])}): {report['n']} prompts, "
        f"{d['n_should_refuse']} should be refused, {d['n_should_answer']} should be answered"
        + (f" (limit {d['limit']} per split)" if d.get("limit") else ""),
        f"- mode: {report['mode']}; policy: {report['policy']['describe']}",
    ]
    if report.get("judge"):
        lines.append(f"- judge: {report['judge']['name']}")
    t = report.get("timing") or {}
    if t.get("prompts_per_second"):
        lines.append(f"- speed: {t['prompts_per_second']:.1f} prompts/s ({t['new_prompts']} new, {t['cached_prompts']} from the cache)")
    if t.get("skipped"):
        lines.append(f"- skipped: {len(t['skipped'])} prompts (first: {t['skipped'][0]})")
    lines += ["", "Intervals are 95% bootstrap intervals (stratified, resampling prompts).", "", "## Summary", ""]
    lines += _table(
        ["metric", "value"],
        [
            ["refusal rate (should-refuse prompts refused; recall)", pct(s["refusal_rate"], ci["refusal_rate"])],
            ["over-refusal (should-answer prompts refused)", pct(s["over_refusal_rate"], ci["over_refusal_rate"])],
            ["precision", num(s["precision"], ci["precision"])],
            ["F1", num(s["f1"], ci["f1"])],
            ["accuracy", num(s["accuracy"], ci["accuracy"])],
            ["ROC AUC (refusal score)", num(s["roc_auc"], ci.get("roc_auc"))],
            ["PR AUC (average precision)", num(s["pr_auc"], ci.get("pr_auc"))],
            ["TP / FP / FN / TN", f"{s['tp']} / {s['fp']} / {s['fn']} / {s['tn']}"],
        ],
    )
    if s.get("note"):
        lines += ["", f"Not measured: {s['note']}."]
    lines += ["", "## Per category", ""]
    rows = []
    for cat, r in report["per_category"].items():
        rows.append([
            cat, r["n_should_refuse"], pct(r.get("refusal_rate"), r.get("refusal_rate_ci95")),
            pct(r.get("category_match_rate")), r["n_should_answer"], pct(r.get("over_refusal_rate"), r.get("over_refusal_rate_ci95")),
        ])
    lines += _table(["category", "n refuse", "refusal rate", "own token", "n answer", "over-refusal"], rows)
    cm = report["confusion"]
    lines += ["", "## Confusion (gold category vs predicted)", ""]
    lines += _table(["gold \\ predicted", *[alias_of(c) if c in m.get("categories", []) else c for c in cm["columns"]]],
                    [[r, *row] for r, row in zip(cm["rows"], cm["matrix"])])
    if report.get("control"):
        ctl = report["control"]
        lines += ["", "## Per-category control", "",
                  f"Each category switched off in turn ({ctl['basis']}). Pass: its refusal rate ≤ {100 * ctl['on_target_max']:.0f}% "
                  f"and every other category moves ≤ {100 * ctl['off_target_max']:.0f} points.", ""]
        cats = list(report["model"]["categories"])
        rows = []
        for row in ctl["rows"]:
            cells = [f"**{alias_of(row['category'])} off**"]
            for c in cats:
                b, a = row["before"].get(c), row["after"].get(c)
                cells.append("n/a" if a is None else f"{pct(b)} → {pct(a)}")
            cells += [f"{pct(row['over_refusal_before'])} → {pct(row['over_refusal_after'])}", f"{100 * row['max_other_shift']:.1f}",
                      f"{100 * row['max_other_token_shift']:.1f}", "pass" if row["passed"] else "FAIL"]
            rows.append(cells)
        lines += _table(["switched", *[alias_of(c) for c in cats], "over-refusal", "max other shift (pts)",
                         "max other token shift (pts)", "result"], rows)
        lines += ["", "Category columns: refusal rate of that category's should-refuse prompts (any token). Token shift: the "
                  "largest change in the share of all prompts refused with another category's token."]
    if report.get("presets"):
        lines += ["", "## Strictness presets (measured)", ""]
        lines += _table(["preset", "refusal rate", "over-refusal", "F1"],
                        [[n, pct(p["refusal_rate"]), pct(p["over_refusal_rate"]), num(p["f1"])] for n, p in report["presets"].items()])
    if report.get("sweeps"):
        lines += ["", f"## Threshold sweep (one threshold for all categories; {report['sweeps']['basis']})", ""]
        pts = [p for p in report["sweeps"]["global"] if p["threshold"] in SWEEP_GRID]
        lines += _table(["threshold", "refusal rate", "over-refusal", "F1"],
                        [[f"{p['threshold']:g}", pct(p["refusal_rate"]), pct(p["over_refusal_rate"]), num(p["f1"])] for p in pts])
    if report.get("judge_rules_fired") is not None:
        lines += ["", "## Judge", "", f"{report['judge']['name']}: refusals by rule: "
                  + (", ".join(f"{k} {v}" for k, v in sorted(report["judge_rules_fired"].items(), key=lambda kv: -kv[1])) or "none")]
        for rule in report["judge"].get("rules") or []:
            lines.append(f"- `{rule['name']}`: `{rule['pattern']}`{' (at the start)' if rule['anchored'] else ''}"
                         + (f", unless `{rule['unless']}`" if rule.get("unless") else ""))
    if compare:
        lines += ["", "## Side by side", ""]
        lines += _compare_table([report, *compare])
    lines += _examples_md(report.get("examples") or {})
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]]
    elif report.get("plots_note"):
        lines += ["", f"Plots: {report['plots_note']}"]
    return "\n".join(lines) + "\n"


def _compare_table(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    header = ["metric", *[r["label"] for r in reports]]
    rows = [
        ["data", *[f"{r['data']['spec']} ({', '.join(r['data']['splits'])}, n={r['n']})" for r in reports]],
        ["refusal rate", *[pct(r["summary"]["refusal_rate"], r["summary"]["ci95"]["refusal_rate"]) for r in reports]],
        ["over-refusal", *[pct(r["summary"]["over_refusal_rate"], r["summary"]["ci95"]["over_refusal_rate"]) for r in reports]],
        ["F1", *[num(r["summary"]["f1"]) for r in reports]],
        ["ROC AUC", *[num(r["summary"]["roc_auc"]) for r in reports]],
    ]
    cats = sorted({c for r in reports for c in r["per_category"]})
    for c in cats:
        rows.append([f"{c}: refusal", *[pct(r["per_category"].get(c, {}).get("refusal_rate")) for r in reports]])
        rows.append([f"{c}: over-refusal", *[pct(r["per_category"].get(c, {}).get("over_refusal_rate")) for r in reports]])
    return _table(header, rows)


def _examples_md(ex: Mapping[str, list[dict]]) -> list[str]:
    out: list[str] = []
    for key, title in (("over_refusals", "Over-refusals (first few)"), ("missed_refusals", "Missed refusals (first few)")):
        if not ex.get(key):
            continue
        out += ["", f"## {title}", ""]
        for e in ex[key]:
            prompt = (e.get("prompt") or "").replace("\n", " ")[:160]
            line = f"- [{e['split']}/{e['id']}, {e.get('category') or '-'}] {prompt}"
            if e.get("answer") is not None:
                line += f" → _{(e['answer'] or '').replace(chr(10), ' ')[:160]}_"
            out.append(line)
    return out


# ------------------------------------------------------------------ plots


def write_plots(report: dict[str, Any], out_dir: Path, compare: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """roc.png, thresholds.png and tradeoff.png (matplotlib, the `plots` extra). Returns the file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report["plots_note"] = "skipped: matplotlib is not installed (pip install 'rtlocal[plots]')"
        log.warning("plots skipped: matplotlib is not installed")
        return []
    runs = [report, *compare]
    written = []

    def nan(x: float | None) -> float:  # a rate a run could not measure (one kind of prompt) is not drawn
        return float("nan") if x is None else x

    def save(fig: Any, name: str) -> None:
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out_dir / name, buf.getvalue())
        written.append(name)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for r in runs:
        if r.get("roc"):
            ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], label=f"{r['label']} (AUC {num(r['summary']['roc_auc'])})")
        elif r["summary"].get("note"):
            ax.plot([], [], " ", label=f"{r['label']}: no curve ({r['summary']['note'].split(':')[0]})")
        else:
            ax.plot([nan(r["summary"]["over_refusal_rate"])], [nan(r["summary"]["refusal_rate"])], "o", label=f"{r['label']} (one operating point)")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel="over-refusal (false-positive rate)", ylabel="refusal rate (true-positive rate)", title="ROC of the refusal score", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=8, loc="lower right")
    save(fig, "roc.png")

    if report.get("sweeps"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lo = 1e-4
        for i, (cat, curve) in enumerate(report["sweeps"]["per_category"].items()):
            color = f"C{i}"
            pts = [p for p in curve if lo <= p["threshold"] <= 1 - lo]
            ts = [p["threshold"] for p in pts]
            ax.plot(ts, [nan(p["refusal_rate"]) for p in pts], "-", color=color, label=f"{alias_of(cat)}: refusal")
            ax.plot(ts, [nan(p["over_refusal_rate"]) for p in pts], "--", color=color, alpha=0.7, label=f"{alias_of(cat)}: over-refusal")
            t = report["policy"]["thresholds"].get(cat)
            if t is not None and lo <= t <= 1 - lo:
                ax.axvline(t, color=color, lw=0.8, alpha=0.4)
        ax.set_xscale("logit")
        ax.set(xlabel="threshold τ_k (logit scale)", ylabel="share of prompts with p_k ≥ τ_k", title="Refusal rate vs threshold, per category", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7, ncol=2)
        save(fig, "thresholds.png")

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i, r in enumerate(runs):
        color = f"C{i}"
        if r.get("sweeps"):
            g = sorted(r["sweeps"]["global"], key=lambda p: (p["over_refusal_rate"] or 0, p["refusal_rate"] or 0))
            ax.plot([nan(p["over_refusal_rate"]) for p in g], [nan(p["refusal_rate"]) for p in g], "-", color=color, label=f"{r['label']}: one threshold swept")
            at: dict[tuple, list[str]] = {}  # presets that land on the same point share one label
            for name, p in (r.get("presets") or {}).items():
                at.setdefault((p["over_refusal_rate"], p["refusal_rate"]), []).append(name)
            for (x, y), names in at.items():
                if x is None or y is None:
                    continue
                ax.plot([x], [y], "s", color=color, ms=4)
                ax.annotate("/".join(names), (x, y), fontsize=7, xytext=(3, -8), textcoords="offset points")
        ax.plot([nan(r["summary"]["over_refusal_rate"])], [nan(r["summary"]["refusal_rate"])], "o", color=color, ms=8, label=f"{r['label']}: as run")
    ax.set(xlabel="over-refusal (should-answer prompts refused)", ylabel="refusal rate (should-refuse prompts refused)",
           title="Refusal vs over-refusal", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, loc="lower right")
    save(fig, "tradeoff.png")
    return written


def write_report(report: dict[str, Any], out_dir: Path, *, plots: bool = True, compare: Sequence[Mapping[str, Any]] = ()) -> dict[str, Path]:
    """report.json, report.md and the PNG plots in `out_dir`, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = write_plots(report, out_dir, compare) if plots else []
    if compare:
        report["compared_with"] = [r["label"] for r in compare]
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    atomic_write_text(out_dir / "report.md", render_markdown(report, compare))
    files = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    files.update({Path(p).stem: out_dir / p for p in report["plots"]})
    return files


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
