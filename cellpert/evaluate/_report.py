"""Plots and an HTML report of an ATE evaluation (matplotlib, Agg backend)."""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellpert._errors import CellpertInputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cellpert.evaluate._evaluate import AteEvaluation

__all__ = ["ate_report_figure", "write_ate_report"]

logger = logging.getLogger(__name__)

#: Colours of the predictors in the bar chart.
_COLOURS = {"model": "#1f77b4", "average": "#2ca02c", "additive": "#d62728", "mean": "#7f7f7f"}


def _labels_of(evaluation: AteEvaluation, split: str) -> list[str]:
    per = evaluation.per_perturbation
    if split == "all":
        return list(per.index)
    chosen = [label for label in per.index if split in str(per.loc[label, "split"]).split("+")]
    return chosen or list(per.index)


def ate_report_figure(evaluation: AteEvaluation, *, split: str = "test", top_n: int | None = None) -> Figure:
    """Model vs data ATE scatter and per-perturbation metric bars.

    Left: every (gene, label) pair of the split's labels, model ATE against data ATE
    (grey), with each label's ``top_n`` genes by \\|data ATE\\| highlighted. Right: the
    model's per-perturbation top-``top_n`` Pearson r as bars, with the additive (red
    tick) and mean (grey tick) baselines marked. A data-only evaluation shows the data
    ATE's largest effects instead.

    Parameters
    ----------
    evaluation
        From :func:`cellpert.evaluate.evaluate_ate` / ``compute_ate_evaluation``.
    split
        Labels to show (``train``, ``val``, ``test``, ``all``); all labels when the split
        has none.
    top_n
        Highlighted genes per label (default: the evaluation's ``top_n``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    top_n = int(top_n or evaluation.config.get("top_n", 20))
    labels = [c for c in _labels_of(evaluation, split) if c in evaluation.data_ate.columns]
    data = evaluation.data_ate[labels].to_numpy(dtype=np.float64)
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax_scatter, ax_bars = fig.subplots(1, 2, width_ratios=[1, 1.3])
    n = min(top_n, data.shape[0])
    top = np.argsort(-np.abs(data), axis=0, kind="stable")[:n]
    top_mask = np.zeros_like(data, dtype=bool)
    np.put_along_axis(top_mask, top, True, axis=0)

    if evaluation.model_ate is None:
        # data only: the size of each label's effects
        ax_scatter.hist(data.ravel(), bins=60, color="#7f7f7f")
        ax_scatter.set_xlabel("data ATE (all genes, all labels)")
        ax_scatter.set_ylabel("count")
        ax_scatter.set_yscale("log")
        strength = np.sort(np.abs(data), axis=0)[::-1][:n].mean(axis=0)
        order = np.argsort(-strength)
        ax_bars.bar(np.arange(len(labels)), strength[order], color=_COLOURS["model"])
        ax_bars.set_xticks(np.arange(len(labels)), [labels[i] for i in order], rotation=90, fontsize=7)
        ax_bars.set_ylabel(f"mean |data ATE| of the top {n} genes")
        fig.suptitle(f"data ATE, {len(labels)} labels ({split})")
        return fig

    model = evaluation.model_ate.ate[labels].to_numpy(dtype=np.float64)
    ax_scatter.scatter(data[~top_mask], model[~top_mask], s=3, c="#bbbbbb", alpha=0.5, lw=0, label="other genes")
    ax_scatter.scatter(
        data[top_mask], model[top_mask], s=8, c=_COLOURS["model"], alpha=0.8, lw=0, label=f"top {n} genes per label"
    )
    lim = float(np.nanmax(np.abs(np.concatenate([data.ravel(), model.ravel()])))) * 1.05 or 1.0
    ax_scatter.plot([-lim, lim], [-lim, lim], c="k", lw=0.7, ls="--")
    ax_scatter.set_xlim(-lim, lim)
    ax_scatter.set_ylim(-lim, lim)
    ax_scatter.set_xlabel("data ATE")
    ax_scatter.set_ylabel(f"model ATE ({evaluation.key})")
    ax_scatter.legend(loc="upper left", fontsize=8, frameon=False)
    summary = evaluation.summary
    col = split if summary is not None and split in summary.columns else "all"
    if summary is not None:
        r, r_top = summary.loc["model_pearson", col], summary.loc["model_pearson_top", col]
        title = f"{len(labels)} labels ({col}): r = {r:.3f}, top-{n} r = {r_top:.3f}"
        if "ceiling_pearson" in summary.index and summary.loc["ceiling_pearson", col] == summary.loc["ceiling_pearson", col]:
            title += f"\nnoise ceiling r = {summary.loc['ceiling_pearson', col]:.3f}, top-{n} {summary.loc['ceiling_pearson_top', col]:.3f}"
        ax_scatter.set_title(title, fontsize=10)
    target = evaluation.config.get("target")
    if target:
        fig.suptitle(f"scored against: {target}", fontsize=9)

    per = evaluation.per_perturbation.loc[labels]
    values = per["model_pearson_top"].to_numpy(dtype=np.float64)
    order = np.argsort(-np.nan_to_num(values, nan=-2.0))
    x = np.arange(len(labels))
    ax_bars.bar(x, values[order], color=_COLOURS["model"], label="model")
    for name, marker in (("additive", "_"), ("mean", "_"), ("average", "_")):
        column = f"{name}_pearson_top"
        if column in per.columns:
            ax_bars.scatter(
                x, per[column].to_numpy(dtype=np.float64)[order], marker=marker, s=180, lw=2.5,
                c=_COLOURS[name], label=f"{name} baseline", zorder=3,
            )  # fmt: skip
    ax_bars.axhline(0, c="k", lw=0.6)
    ax_bars.set_xticks(x, [labels[i] for i in order], rotation=90, fontsize=7)
    ax_bars.set_ylabel(f"per-perturbation Pearson r, top {n} genes")
    ax_bars.set_ylim(-1.05, 1.05)
    ax_bars.legend(loc="lower left", fontsize=8, frameon=False)
    return fig


def _notes(evaluation: AteEvaluation) -> str:
    """What every figure used, the noise ceiling and how far the intervals can be trusted."""
    config = evaluation.config
    items = [f"Every table and figure is scored against: {config.get('target', 'the data ATE')}."]
    combined = config.get("model_ate_combined")
    if combined and config.get("model_ate_estimator") == "combined":
        items.append(
            f"Combined estimator: {combined['weight']:.2f} x the training-cell average + "
            f"{1 - combined['weight']:.2f} x the model's posterior estimate, the weight fitted on the validation "
            f"cells ({combined['how']}; {combined['combined_labels']} labels combined)."
        )
    if config.get("model_ate_estimator"):
        items.append(
            f"Model ATE: {config['model_ate_estimator']} estimator; interval: {config.get('model_ate_interval_kind')}. "
            "Baselines from training cells only: average (each label's training cells' average effect), "
            "additive (the sum of its parts'), mean."
        )
    summary = evaluation.summary
    col = config.get("target_split")
    if summary is not None and col in summary.columns and summary.loc["ceiling_pearson", col] == summary.loc["ceiling_pearson", col]:
        items.append(
            f"Noise ceiling of the {col} cells (a perfect predictor, from split halves): r {summary.loc['ceiling_pearson', col]:.3f}, "
            f"top-N r {summary.loc['ceiling_pearson_top', col]:.3f}; the training-cell average is expected to reach "
            f"r {summary.loc['expected_train_average_pearson', col]:.3f} from noise alone."
        )
    cal = config.get("interval_calibration")
    if cal:
        verdict = "over-confident" if cal["coverage_before"] < 0.85 else ("conservative" if cal["coverage_before"] > 0.95 else "about right")
        items.append(
            f"The model's 90% intervals cover {cal['coverage_before']:.0%} of the validation cells' ATE (their noise "
            f"accounted for): {verdict}. Recalibrated intervals (posterior half-width and the training "
            f"cells' standard error combined, scaled by {cal['factor']:.2f}) cover {cal['coverage_after']:.0%} "
            "(varm ..._cal_lo / _cal_hi)."
        )
    truth = config.get("truth")
    if truth:
        names = [n for n in evaluation.predictors if f"{n}_pearson" in truth]
        figures = "; ".join(f"{n} r {truth[f'{n}_pearson']:.4f} (top-{truth['top_n']} r {truth[f'{n}_pearson_top']:.4f})"
                            for n in names)  # fmt: skip
        coverage = f" The model's 90% intervals cover {truth['coverage']:.0%} of the true effects." if "coverage" in truth else ""
        items.append(
            f"Against the simulator's true ATE ({truth['labels']} labels, {truth['n_cells_per_label']:,} cells each): "
            f"{figures}.{coverage}"
        )
    return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def _summary_table(evaluation: AteEvaluation) -> pd.DataFrame:
    if evaluation.summary is None:
        return evaluation.per_perturbation
    return evaluation.summary


def _level_section(evaluation: AteEvaluation) -> str:
    """The per-level table (with ``level_key``): every predictor within each level."""
    if evaluation.per_level is None:
        return ""
    key = evaluation.config.get("level_key")
    pool = evaluation.config.get("pool")
    intro = (
        f"Within each level of obs[{key!r}]: each predictor against that level's held-out target "
        f"(the summary above pools the levels, {pool} weights)."
    )
    table = evaluation.per_level.to_html(float_format=lambda v: f"{v:.4g}", na_rep="")
    return f"<h2>Per level of {html.escape(str(key))}</h2>\n<p>{html.escape(intro)}</p>\n{table}\n"


def write_ate_report(
    evaluation: AteEvaluation, path: str | os.PathLike, *, split: str = "test", dpi: int = 110
) -> Path:
    """Write the figure of :func:`ate_report_figure` as ``.png``, or an ``.html`` report.

    The HTML report embeds the PNG (base64) and holds the summary table (metric x
    split), the per-level table (ATEs by level) and the per-perturbation table, so it is
    one self-contained file.

    Parameters
    ----------
    evaluation
        The evaluation.
    path
        Output file ending in ``.png`` or ``.html``.
    split
        Labels shown in the figure.
    dpi
        Resolution of the PNG.

    Returns
    -------
    Path
        The file written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise CellpertInputError(f"--report {path}: use a .png or .html file name.")
    if not path.parent.is_dir():
        raise CellpertInputError(f"{path.parent}: no such directory for the report.")
    fig = ate_report_figure(evaluation, split=split)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    png = buffer.getvalue()
    if suffix == ".png":
        path.write_bytes(png)
        return path
    encoded = base64.b64encode(png).decode("ascii")
    title = f"cellpert ATE evaluation: {evaluation.key}"
    settings = {k: v for k, v in evaluation.config.items() if k not in ("identity", "timings") and np.isscalar(v)}
    identity = evaluation.config.get("identity") or {}
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in {**{k: identity[k] for k in ("model", "run_dir") if k in identity}, **settings}.items()
    )
    doc = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} th{{background:#f4f4f4}}</style></head>
<body><h1>{html.escape(title)}</h1>
{_notes(evaluation)}
<img alt="model vs data ATE" src="data:image/png;base64,{encoded}" style="max-width:100%">
<h2>Summary (metric x split)</h2>
{_summary_table(evaluation).to_html(float_format=lambda v: f"{v:.4g}", na_rep="")}
{_level_section(evaluation)}<h2>Per perturbation</h2>
{evaluation.per_perturbation.to_html(float_format=lambda v: f"{v:.4g}", na_rep="")}
<h2>Settings</h2><table>{rows}</table>
</body></html>
"""
    path.write_text(doc, encoding="utf-8")
    return path
