"""The report of an experiment: the paper's table, ours as mean ± sd over split seeds.

Rows are the models (one per sweep point) and the baselines their jobs return; columns
the metrics of the experiment's ``report.metrics``, each followed by the reference value
(``reference`` of the model's config, e.g. MODELS.md §9) where one is known. Derived
metrics (``report.derived``) are differences to another model's value on the same split
seed (the Norman table's IWELBO relative to SAMS-VAE correlated at f = 0).
"""

from __future__ import annotations

import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments._config import Experiment, Job, _rel

DEFAULT_FORMAT = ".3f"


@dataclass
class Row:
    """One line of the table: a model at one sweep point, or a baseline."""

    label: str
    kind: str  # "model" or "baseline"
    values: dict[str, list[float]] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _matches(where: dict | None, point: dict) -> bool:
    return all(k in point and _same(point[k], v) for k, v in (where or {}).items())


def _point_label(point: dict, names: dict[str, str]) -> str:
    return ", ".join(f"{names.get(k, k.rsplit('.', 1)[-1])} = {v:g}" if isinstance(v, float)
                     else f"{names.get(k, k.rsplit('.', 1)[-1])} = {v}" for k, v in point.items())  # fmt: skip


def build_rows(exp: Experiment, jobs: list[Job], records: dict[str, dict]) -> list[Row]:
    """Model rows (in job order) then baseline rows, from the finished jobs' records."""
    report = exp.report
    names = report.get("sweep_labels") or {}
    metrics = {j.key: dict(records[j.key]["result"]["metrics"]) for j in jobs if j.key in records}
    # derived metrics: value minus the named model's value on the same seed
    for derived in report.get("derived") or []:
        refs = {
            j.seed: metrics[j.key].get(derived["of"])
            for j in jobs
            if j.key in metrics and j.model_id == derived["model"] and _matches(derived.get("where"), j.sweep)
        }
        for j in jobs:
            if j.key in metrics and derived["of"] in metrics[j.key] and refs.get(j.seed) is not None:
                metrics[j.key][derived["key"]] = metrics[j.key][derived["of"]] - refs[j.seed]
    references = {m.model_id: m.config.get("reference") or [] for m in exp.models}
    rows: dict[tuple, Row] = {}
    for j in jobs:
        key = (j.model_id, tuple(sorted(j.sweep.items(), key=lambda kv: kv[0])))
        if key not in rows:
            point = _point_label(j.sweep, names)
            row = Row(label=j.label + (f", {point}" if point else ""), kind="model")
            for entry in references.get(j.model_id, []):
                if _matches(entry.get("where"), j.sweep):
                    row.reference.update({k: float(v) for k, v in entry.items() if k != "where" and v is not None})
            rows[key] = row
        if j.key in metrics:
            rows[key].seeds.append(j.seed)
            for name, value in metrics[j.key].items():
                rows[key].values.setdefault(name, []).append(value)
    wanted = report.get("baselines")
    seen: set[tuple] = set()
    baseline_rows: dict[tuple, Row] = {}
    for j in jobs:
        if j.key not in records:
            continue
        # baselines do not depend on the model: group by the data and split sweep keys only
        point = {k: v for k, v in j.sweep.items() if k.startswith(("data.", "split."))}
        for name, values in (records[j.key]["result"].get("baselines") or {}).items():
            if wanted is not None and name not in wanted:
                continue
            key = (name, tuple(sorted(point.items())))
            if (key, j.seed) in seen:
                continue
            seen.add((key, j.seed))
            if key not in baseline_rows:
                label = _point_label(point, names)
                baseline_rows[key] = Row(label=f"{name}" + (f", {label}" if label else ""), kind="baseline")
            baseline_rows[key].seeds.append(j.seed)
            for metric, value in values.items():
                baseline_rows[key].values.setdefault(metric, []).append(value)
    order = {name: i for i, name in enumerate(wanted or [])}
    ordered = sorted(baseline_rows.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0]))
    return list(rows.values()) + [row for _, row in ordered]


def _metrics(exp: Experiment, rows: list[Row]) -> list[dict]:
    listed = exp.report.get("metrics")
    if listed:
        return [{"format": DEFAULT_FORMAT, "label": m["key"], **m} for m in listed]
    keys = sorted({k for r in rows for k in r.values})
    return [{"key": k, "label": k, "format": DEFAULT_FORMAT} for k in keys]


def mean_sd(values: list[float], fmt: str) -> str:
    """``mean ± sd`` (sd over seeds, ddof 1) or the single value; ``–`` when none."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(values), fmt)}"


def table(exp: Experiment, rows: list[Row]) -> str:
    """The markdown table: per metric ours, and the reference column where any is known."""
    ref_name = exp.report.get("reference_name", "paper")
    header = ["model", "seeds"]
    cols = []
    for metric in _metrics(exp, rows):
        header.append(metric["label"])
        cols.append((metric, False))
        if any(metric["key"] in r.reference for r in rows):
            header.append(f"{metric['label']} ({ref_name})")
            cols.append((metric, True))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.label if row.kind == "model" else f"*{row.label}*", str(len(row.seeds))]
        for metric, is_ref in cols:
            if is_ref:
                value = row.reference.get(metric["key"])
                cells.append("–" if value is None else format(value, metric["format"]))
            else:
                cells.append(mean_sd(row.values.get(metric["key"], []), metric["format"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(exp: Experiment, rows: list[Row], path: Path) -> Path | None:
    """Bars of ours (mean, sd over seeds) per row and metric, reference values as diamonds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    wanted = exp.report.get("figure")
    metrics = [m for m in _metrics(exp, rows) if (m["key"] in wanted if wanted else True)][:4]
    metrics = [m for m in metrics if any(m["key"] in r.values for r in rows)]
    if not metrics or not rows:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 2.5, 0.32 * len(rows) + 1.4),
                             squeeze=False, sharey=True)  # fmt: skip
    ys = list(range(len(rows)))[::-1]
    for ax, metric in zip(axes[0], metrics, strict=True):
        means = [statistics.fmean(r.values[metric["key"]]) if r.values.get(metric["key"]) else math.nan for r in rows]
        sds = [statistics.stdev(r.values[metric["key"]]) if len(r.values.get(metric["key"], [])) > 1 else 0.0
               for r in rows]  # fmt: skip
        colours = ["#4c72b0" if r.kind == "model" else "#999999" for r in rows]
        ax.barh(ys, means, xerr=sds, color=colours, height=0.6, capsize=2)
        refs = [(y, r.reference[metric["key"]]) for y, r in zip(ys, rows, strict=True) if metric["key"] in r.reference]
        if refs:
            ax.scatter([v for _, v in refs], [y for y, _ in refs], marker="D", color="black", s=18, zorder=3,
                       label=exp.report.get("reference_name", "paper"))  # fmt: skip
            ax.legend(fontsize=7, frameon=False, loc="best")
        ax.set_title(metric["label"], fontsize=9)
        ax.axvline(0, color="black", linewidth=0.5)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels([r.label for r in rows], fontsize=7)
    fig.suptitle(exp.title + (" (FAST)" if exp.fast else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100)
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return path


def _settings(exp: Experiment) -> str:
    """Each model's resolved config (without its reference numbers), as YAML."""
    parts = []
    for model in exp.models:
        shown = {k: v for k, v in model.config.items() if k not in ("reference",)}
        text = yaml.safe_dump(shown, sort_keys=False, allow_unicode=True, width=110).rstrip()
        parts.append(f"`{_rel(model.path)}`:\n\n```yaml\n{text}\n```")
    return "\n\n".join(parts)


def write_report(
    exp: Experiment,
    jobs: list[Job],
    records: dict[str, dict],
    *,
    report_dir: Path,
    command: str,
    failed: list[tuple[Job, str]],
    cached: set[str],
) -> tuple[Path, str]:
    """Write ``<report_dir>/<experiment>[.fast].md`` (and ``.png``); returns the path and the table."""
    rows = build_rows(exp, jobs, records)
    text_table = table(exp, rows)
    stem = exp.name + (".fast" if exp.fast else "")
    md_path = report_dir / f"{stem}.md"
    png = figure(exp, rows, report_dir / f"{stem}.png")
    done = [j for j in jobs if j.key in records]
    job_s = sum(float(records[j.key].get("wall_s", 0.0)) for j in done)
    seeds = sorted({j.seed for j in jobs})
    mode = ("**FAST**: small settings to check that everything runs; the numbers are not comparable with the "
            "reference column." if exp.fast else "Full settings.")  # fmt: skip
    lines = [
        f"# {exp.title}",
        "",
        f"{mode} Command: `{command}`. Jobs: {len(done)} of {len(jobs)} finished "
        f"({len(cached & {j.key for j in done})} from the cache), split seeds {', '.join(map(str, seeds))}; "
        f"job time {job_s:.0f} s in all. Values: mean ± sd over split seeds.",
        "",
        text_table,
        "",
    ]
    source = exp.report.get("reference_source")
    if source:
        lines += [f"Reference ({exp.report.get('reference_name', 'paper')}): {source}", ""]
    if exp.report.get("notes"):
        lines += [str(exp.report["notes"]).strip(), ""]
    if failed:
        lines += ["Failed jobs (not in the table):", ""]
        lines += [f"- {j.description}: {err}" for j, err in failed] + [""]
    if png is not None:
        lines += [f"![{exp.name}]({png.name})", ""]
    lines += ["## Jobs", "", "| model | seed | sweep | hash | wall s | |", "|---|---|---|---|---|---|"]
    for j in jobs:
        rec = records.get(j.key)
        state = "cached" if j.key in cached else ("done" if rec else "missing")
        wall = f"{rec['wall_s']:.0f}" if rec else "–"
        sweep = ", ".join(f"{k} = {v}" for k, v in j.sweep.items()) or "–"
        lines.append(f"| {j.model_id} | {j.seed} | {sweep} | `{j.key}` | {wall} | {state} |")
    lines += ["", "## Settings", "", _settings(exp), ""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = md_path.with_name(f".{md_path.name}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(md_path)
    return md_path, text_table
