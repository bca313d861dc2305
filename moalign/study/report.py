"""``moalign report DIR``: a study (or a single run) as one self-contained HTML page, a Markdown page and PNG figures.

Sections, in order: findings (sentences generated from the verdicts and intervals) · held-out expected reward per
objective and algorithm, one panel per model × objective (the paper's Figure 1 layout), mean over seeds with a min–max
band · per-objective change table with 95% intervals, verdicts and hypervolumes · interference per algorithm · each
algorithm against linear (seeds paired) · covariance-law agreement where it is measurable (when runs log
``law/cov_w/<objective>``) · weight trajectories · Pareto scatter of the final points with the hypervolume's reference
point · cost of training and of evaluation. The numbers come from ``moalign.study.findings`` and
``moalign.study.agreement``.

The document is a list of blocks (headings, paragraphs, tables, images) rendered twice: HTML with every figure embedded
as a base64 PNG (one file to share), and Markdown with the figures as PNG files in ``figures/`` next to it.
Matplotlib is used through its object API on the Agg canvas: no display and no pyplot global state.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from moalign.diagnostics.law import AgreementBin
from moalign.study.agreement import EVALUATION, LawScale, describe_scale
from moalign.study.findings import (
    BASELINE,
    Findings,
    StudyRun,
    comparison_key,
    contrast_name,
    cost_rows,
    evaluation_cost_rows,
    join,
    load_study,
    own_verdicts,
    signed,
    with_interval,
)

# ------------------------------------------------------------------------------------------------ document blocks


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str  # **bold** is the only markup


@dataclass(frozen=True)
class Bullets:
    items: list[str]  # **bold** is the only markup


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass(frozen=True)
class Image:
    name: str  # file stem under figures/
    png: bytes
    caption: str


Block = Union[Heading, Paragraph, Bullets, Table, Image]

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: bottom; font-size: 12px; color: #555; padding-top: 4px; text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { font-size: 13px; color: #555; }
"""


def _bold_html(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def render_html(title: str, blocks: Sequence[Block]) -> str:
    head = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>")
    parts = [head]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{_bold_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_bold_html(item)}</li>" for item in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in b.columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            caption = f"<caption>{html.escape(b.caption)}</caption>" if b.caption else ""
            parts.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(b.png).decode()
            parts.append(f"<figure><img alt='{html.escape(b.name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _md(text: str) -> str:
    """Text for Markdown that renders as written: names from runs (models, objectives, directories) may hold HTML or
    link syntax (``<script>``, ``![x](url)``); only the report's own ``**bold**`` stays markup. One line."""
    text = str(text).replace("\n", " ")  # a line break in a name could start a heading or a list
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`\[\]])", r"\\\1", text)


def render_markdown(title: str, blocks: Sequence[Block], figures_folder: str = "figures") -> str:
    def cell(text: str) -> str:
        return _md(text).replace("|", "\\|")

    parts = [f"# {_md(title)}"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"{'#' * b.level} {_md(b.text)}")
        elif isinstance(b, Paragraph):
            parts.append(_md(b.text))
        elif isinstance(b, Bullets):
            parts.append("\n".join(f"- {_md(item)}" for item in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(cell(c) for c in b.columns) + " |",
                     "|" + "|".join(["---"] * len(b.columns)) + "|"]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in b.rows]
            if b.caption:
                lines.append(f"\n*{_md(b.caption)}*")
            parts.append("\n".join(lines))
        else:
            parts.append(f"![{_md(b.name)}]({figures_folder}/{b.name}.png)\n\n*{_md(b.caption)}*")
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ figures


def new_figure(rows: int, cols: int, panel: tuple[float, float] = (3.8, 2.7)) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(panel[0] * cols, panel[1] * rows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.array(fig.subplots(rows, cols, squeeze=False))
    return fig, axes


def to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


class Palette:
    """One colour per algorithm label, the same in every figure (linear, the baseline, is black). The strong tab10
    colours come first (gray left out: it reads as "disabled"), then the light tab20 ones."""

    def __init__(self, labels: Sequence[str]):
        strong = [colormaps["tab10"](i) for i in range(10) if i != 7]
        light = [colormaps["tab20"](2 * i + 1) for i in range(10) if i != 7]
        cycle = strong + light
        others = [label for label in labels if label != "linear"]
        self.colors = {label: cycle[i % len(cycle)] for i, label in enumerate(others)}
        self.colors["linear"] = (0.0, 0.0, 0.0, 1.0)

    def __getitem__(self, label: str):
        return self.colors.get(label, (0.5, 0.5, 0.5, 1.0))


def legend_below(fig: Figure, axes: np.ndarray) -> None:
    """One legend for all panels, below them (each label once)."""
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=min(8, len(handles)), fontsize=8, frameon=False)


def style_step_axis(ax) -> None:
    ax.set_xlabel("step", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def aligned(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Seeds' (steps, values) on the steps all of them logged: (steps [T], values [S, T])."""
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in series))) if series else []
    values = np.array([[dict(zip(s.tolist(), v.tolist()))[t] for t in common] for s, v in series])
    return np.array(common, dtype=int), values.reshape(len(series), len(common))


def plot_seed_band(ax, steps: np.ndarray, values: np.ndarray, color, label: str) -> None:
    """Mean over seeds as a line; with several seeds a band from their minimum to their maximum."""
    if not len(steps):
        return
    ax.plot(steps, values.mean(axis=0), color=color, label=label, lw=1.4, marker="." if len(steps) < 12 else None)
    if len(values) > 1:
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color, alpha=0.15, lw=0)


def curve_split(runs: Sequence[StudyRun]) -> str:
    """Curves use the validation split (evaluated every few steps) when every run has at least two evaluations."""
    def evaluations(r: StudyRun, split: str) -> int:
        return len(r.run.evaluations[split].steps) if split in r.run.evaluations else 0

    return "val" if all(evaluations(r, "val") >= 2 for r in runs) else "test"


def curves_figure(f: Findings, palette: Palette, estimator: str, objective_set: str) -> Optional[Image]:
    configs = [c for c in f.configs if c.first.estimator == estimator and c.first.objective_set == objective_set]
    models = list(dict.fromkeys(c.first.model for c in configs))
    objectives = configs[0].first.run.objectives
    split = curve_split([r for c in configs for r in c.runs])
    modes = {r.run.mode for c in configs for r in c.runs}
    quantity = "expected reward (sampled)" if modes == {"sampled"} else "greedy score" if modes == {"greedy"} else \
        "score (sampled where evaluated so, else greedy)"
    fig, axes = new_figure(len(models), len(objectives))
    for i, model in enumerate(models):
        for j, objective in enumerate(objectives):
            ax = axes[i, j]
            for c in (c for c in configs if c.first.model == model):
                steps, values = aligned([r.curve(split, objective) for r in c.runs])
                plot_seed_band(ax, steps, values, palette[c.label], c.label)
            ax.set_title(f"{model} · {objective}", fontsize=9)
            ax.set_ylabel(quantity, fontsize=8)
            style_step_axis(ax)
    legend_below(fig, axes)
    seeds = max(len(c.runs) for c in configs)
    band = "line = mean over seeds, band = lowest to highest seed" if seeds > 1 else "one seed per algorithm"
    return Image(f"curves_{_stem(estimator)}_{_stem(objective_set)}", to_png(fig),
                 f"Held-out {quantity} on the {split} split at every evaluation, estimator {estimator}; rows: models, "
                 f"columns: objectives, one line per algorithm; {band}.")


def weights_figure(f: Findings, palette: Palette, key: tuple[str, str, str]) -> Optional[Image]:
    configs = [c for c in f.configs if comparison_key(c.first) == key]
    objectives = configs[0].first.run.objectives
    with_weights = [c for c in configs if any(len(r.series(f"weight/{o}")[0]) for r in c.runs for o in objectives)]
    if not with_weights:
        return None
    cols = min(5, len(with_weights))
    rows = -(-len(with_weights) // cols)
    fig, axes = new_figure(rows, cols, panel=(3.0, 2.3))
    objective_colors = colormaps["Set1"]
    for ax, c in itertools.zip_longest(axes.flat, with_weights):
        if c is None:
            ax.set_visible(False)
            continue
        for j, objective in enumerate(objectives):
            steps, values = aligned([r.series(f"weight/{objective}") for r in c.runs])
            plot_seed_band(ax, steps, values, objective_colors(j % 9), objective)
        ax.set_title(c.label, fontsize=9, color=palette[c.label])
        style_step_axis(ax)
    legend_below(fig, axes)
    model, estimator, _ = key
    return Image(f"weights_{_stem('_'.join(key))}", to_png(fig),
                 f"Weight trajectories weight/<objective> per algorithm ({model}, {estimator}); mean over seeds with "
                 f"min–max band. Gradient-level algorithms log their effective weights; raw scales differ between "
                 f"algorithms.")


def pareto_figure(f: Findings, palette: Palette) -> Optional[Image]:
    sets = list(f.pareto.items())
    pairs = {key: list(itertools.combinations(range(len(p.objectives)), 2)) for key, p in sets}
    width = max((len(v) for v in pairs.values()), default=0)
    if not sets or width == 0:
        return None
    fig, axes = new_figure(len(sets), width, panel=(3.4, 3.0))
    for i, (key, p) in enumerate(sets):
        for j in range(width):
            ax = axes[i, j]
            if j >= len(pairs[key]):
                ax.set_visible(False)
                continue
            a, b = pairs[key][j]
            for c, point, front in zip(p.configs, p.points, p.on_front):
                ax.scatter(point[a], point[b], color=palette[c.label], label=c.label, s=46 if front else 22,
                           edgecolors="black" if front else "none", linewidths=1.0, zorder=3)
            ax.scatter(p.start[a], p.start[b], marker="x", color="black", s=50, label="start", zorder=4)
            ax.scatter(p.reference[a], p.reference[b], marker="+", color="gray", s=60, label="HV reference",
                       zorder=4)
            ax.set_xlabel(p.objectives[a], fontsize=8)
            ax.set_ylabel(p.objectives[b], fontsize=8)
            if j == 0:  # the row's comparison, once: the panels are narrow
                ax.set_title(textwrap.shorten(f"{key[0]} · {key[1]} (set HV {p.hypervolume:.3f})", 60), fontsize=8,
                             loc="left")
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    legend_below(fig, axes)
    return Image("pareto", to_png(fig),
                 f"Final {f.split} scores (mean over seeds) for each pair of objectives; black-edged points are on the "
                 f"Pareto front over all objectives; × is the mean start point, + the hypervolume's reference point.")


def cost_figure(rows: list[dict], palette: Palette) -> Optional[Image]:
    rows = [r for r in rows if "perf/step_s" in r]
    if not rows:
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    bars = max(len([r for r in rows if r["model"] == m]) for m in models)
    fig, axes = new_figure(1, len(models), panel=(4.2, 0.22 * bars + 0.9))
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        ax.barh([r["algorithm"] for r in mine], [r["perf/step_s"] for r in mine],
                color=[palette[r["algorithm"]] for r in mine])
        ax.invert_yaxis()
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("seconds per step (mean)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="x")
    return Image("cost", to_png(fig), "Mean wall-clock seconds per training step (perf/step_s) per algorithm.")


def _stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


# ------------------------------------------------------------------------------------------------ tables


def change_table(f: Findings) -> Table:
    split = f.split
    rows = []
    for c in f.configs:
        report = c.reports[split]
        pareto = f.pareto.get(comparison_key(c.first))
        hv = "–" if pareto is None else "{:.3f} → {:.3f}".format(*pareto.of(c))
        lines = [(ch.objective, ch) for ch in report.changes] + [("score (λ0)", report.score)]
        for k, (name, ch) in enumerate(lines):
            run_cells = [c.first.model, c.first.estimator, c.label, str(len(c.runs))] if k == 0 else [""] * 4
            verdict = [report.verdict, hv] if k == 0 else [""] * 2
            flag = "DEGRADES" if ch.degrades and name != "score (λ0)" else "falls" if ch.degrades else \
                "rises" if ch.rises else ""
            rows.append(run_cells + [name, f"{ch.start:.3f}", f"{ch.end:.3f}", with_interval(ch), flag, *verdict])
    modes = sorted({c.reports[split].mode for c in f.configs})
    return Table(["model", "estimator", "algorithm", "seeds", "objective", "start", "end", "Δ [95% CI]", "flag",
                  "verdict", "HV start → end"], rows,
                 f"{split} split, {'/'.join(modes)} evaluation; Δ = last − first evaluation; intervals over seeds and "
                 f"prompts (over prompts for a single seed; docs/statistics.md). score (λ0): the fixed scalarization "
                 f"with the weighting's initial weights. An objective degrades when its whole interval is below 0; "
                 f"interference = the score rises while an objective degrades. HV: normalized hypervolume of the "
                 f"start and the end point (Pareto front section).")


def interference_table(f: Findings) -> Table:
    """Per configuration: its verdict with the seeds pooled, what degrades, and how many runs interfere alone."""
    rows, totals = [], [0, 0]
    for c in f.configs:
        report = c.reports[f.split]
        own = own_verdicts([c], f.split)
        if own is None:  # one run: its own verdict is the pooled one
            own = (int(report.interference), 1)
        totals = [totals[0] + own[0], totals[1] + own[1]]
        degraded = [ch for ch in report.changes if ch.degrades]
        rows.append([c.label, c.first.model, c.first.estimator, report.verdict,
                     ", ".join(f"{ch.objective} {with_interval(ch)}" for ch in degraded) or "none",
                     _rate(own)])
    rows.append(["all algorithms", "", "", "", "", _rate(tuple(totals))])
    return Table(["algorithm", "model", "estimator", "verdict (seeds pooled)", "degrading objectives [95% CI]",
                  "runs that interfere"], rows,
                 f"{f.split} split. Runs that interfere: each seed's own verdict (its policy over the prompts), "
                 f"counted per algorithm.")


def baseline_table(f: Findings) -> Optional[Table]:
    """Per algorithm and objective: its change minus the baseline's, seeds paired (None without a baseline)."""
    rows = []
    for paired in f.contrasts.values():
        for c, found in paired:
            for k, item in enumerate(found):
                flag = "higher" if item.higher else "lower" if item.lower else ""
                head = [c.label, c.first.model, c.first.estimator, str(item.estimate.seeds)] if k == 0 else [""] * 4
                rows.append(head + [contrast_name(item.objective), signed(item.baseline_change),
                                    signed(item.other_change), with_interval(item), flag])
    if not rows:
        return None
    return Table(["algorithm", "model", "estimator", "seeds paired", "objective", f"Δ {BASELINE}", "Δ algorithm",
                  f"Δ − Δ {BASELINE} [95% CI]", "flag"], rows,
                 f"{f.split} split. Runs with the same seed start from the same policy and draw the same evaluation "
                 f"completions, so each seed gives a paired difference per prompt; the interval is the crossed seeds "
                 f"× prompts interval of those differences (docs/statistics.md). higher / lower: the whole interval "
                 f"is above / below 0. Each interval is 95% on its own, with no adjustment for the number of rows.")


def _rate(count: tuple[int, int]) -> str:
    return "–" if not count[1] else f"{count[0]}/{count[1]} ({count[0] / count[1]:.0%})"


def _interval(value: float, interval: tuple[float, float], sign: bool = False) -> str:
    if not np.isfinite(value):
        return "–"
    form = "{:+.2f}" if sign else "{:.2f}"
    text = form.format(value) + (" [" + ", ".join(form.format(x) for x in interval) + "]"
                                 if np.all(np.isfinite(interval)) else "")
    return text.replace("-", "−")


def _snr(b: AgreementBin) -> str:
    return f"{b.signal / b.noise:.2f}" if np.isfinite(b.noise) and b.noise > 0 else "–"


def _resolved(b: AgreementBin) -> str:
    return "unknown" if b.resolved is None else "yes" if b.resolved else "no (within noise)"


def law_bin_table(scale: LawScale) -> Table:
    rows = [[f"{b.low:.3g} – {b.high:.3g}" if b.high > b.low else f"{b.low:.3g}", str(b.pairs), _fmt(b.noise),
             _fmt(b.signal), _snr(b), _resolved(b), _interval(b.sign_agreement, b.sign_agreement_ci),
             _interval(b.correlation, b.correlation_ci, sign=True)]
            for b in scale.bins]
    what = ("Σ of the per-step predictions Cov(r_j, w) over each interval between two val evaluations against the "
            "evaluation's change (paired prompts; standard error over prompts)" if scale.scale == EVALUATION else
            "each step's prediction Cov(r_j, w) against the change realised on the probe prompts (paired "
            "completions; standard error over completions)")
    return Table(["|predicted|", "pairs", "noise", "signal", "signal/noise", "resolved", "sign agreement [95% CI]",
                  "correlation [95% CI]"], rows,
                 f"{what}, pooled over objectives, runs and algorithms, in bins of equal count by |predicted| "
                 f"(predictions of exactly 0, from batches whose rewards did not vary, in a bin of their own). noise: "
                 f"root mean square of the realised changes' standard errors; signal: √max(0, mean realised² − "
                 f"noise²), the policy's change beyond it; resolved: signal ≥ noise. Where the changes are within "
                 f"noise a true and a false law both agree about half of the time, so agreement there does not "
                 f"measure the law. Sign agreement leaves out pairs where either change is 0 (Wilson interval); "
                 f"correlation with its Fisher-z interval; both treat pairs as independent.")


def law_algorithm_table(scale: LawScale) -> Table:
    rows = [[algorithm, str(b.pairs), _fmt(b.noise), _fmt(b.signal), _snr(b), _resolved(b),
             _interval(b.sign_agreement, b.sign_agreement_ci), _interval(b.correlation, b.correlation_ci, sign=True)]
            for algorithm, b in scale.algorithms.items()]
    return Table(["algorithm", "pairs", "noise", "signal", "signal/noise", "resolved", "sign agreement [95% CI]",
                  "correlation [95% CI]"], rows,
                 f"The same pairs per algorithm "
                 f"({'per evaluation interval' if scale.scale == EVALUATION else 'per step'}), every size of "
                 f"prediction together.")


def law_blocks(f: Findings) -> list[Block]:
    law = f.law
    if law is None:
        return []
    blocks: list[Block] = [Heading("Covariance-law agreement"), Paragraph(
        "The law (METHOD §2) predicts the sign and first-order size of each objective's change from Cov(r_j, w) on "
        "the training batch. A realised change says something about the law only when it is larger than the noise "
        "of its measurement, so the pairs are binned by the size of the prediction and agreement is read where the "
        "realised changes are resolved.")]
    for scale, title in ((law.interval, "Per evaluation interval"), (law.step, "Per step (probe)")):
        if scale is not None:
            blocks += [Heading(title, 3), Paragraph(describe_scale(scale)), law_bin_table(scale),
                       law_algorithm_table(scale)]
    return blocks


def pareto_table(f: Findings) -> Table:
    rows = []
    for key, p in f.pareto.items():
        reference = ", ".join(f"{o} {v:.3f}" for o, v in zip(p.objectives, p.reference))
        rows.append([*key, join([c.label for c, on in zip(p.configs, p.on_front) if on]), reference,
                     f"{p.start_hypervolume:.3f}", f"{p.hypervolume:.3f}"])
    return Table(["model", "estimator", "objectives", "on the front", "HV reference point", "HV of the start",
                  "HV of the set"], rows,
                 f"{f.split} split. Reference point: per objective, the lowest start or end value of any algorithm in "
                 f"the comparison minus 10% of that objective's range over them (at least 0.01), so every point has "
                 f"a positive volume even where an objective fell. Hypervolumes (HV) are fractions of the box between "
                 f"the reference point and the ideal point (each objective's best start or end value); they compare "
                 f"algorithms within a comparison, not across studies.")


def cost_table(rows: list[dict]) -> Table:
    keys = sorted({k for r in rows for k in r if k not in ("algorithm", "model", "runs", "perf/step_s")})
    baseline = {r["model"]: r.get("perf/step_s") for r in rows if r["algorithm"] == "linear"}
    out = []
    for r in rows:
        step = r.get("perf/step_s")
        base = baseline.get(r["model"])
        ratio = f"{step / base:.2f}×" if step and base else "–"
        out.append([r["algorithm"], r["model"], _fmt(step), ratio, *(_fmt(r.get(k)) for k in keys)])
    names = [k.removeprefix("time/").removeprefix("perf/") for k in keys]
    return Table(["algorithm", "model", "s/step", "× linear", *names], out,
                 "Means over all training steps of all seeds; phases are seconds per step (time/<phase>_s).")


def evaluation_cost_table(rows: list[dict]) -> Table:
    modes = [m for m in ("sampled", "greedy") if any(f"{m}_seconds" in r for r in rows)]
    out = []
    for r in rows:
        cells = [r["algorithm"], r["model"], str(r["runs"]), _fmt(r["train_s"]), _tokens(r["train_tokens"])]
        for m in modes:
            cells += [_fmt(r.get(f"{m}_seconds")), _tokens(r.get(f"{m}_tokens"))]
        out.append(cells)
    columns = ["algorithm", "model", "runs", "training s", "training tokens"]
    columns += [f"{m} eval {what}" for m in modes for what in ("s", "tokens")]
    return Table(columns, out, "Totals over each algorithm's runs: training seconds Σ perf/step_s (the law "
                               "monitor's probe included) and generated tokens; held-out evaluation seconds and "
                               "generated tokens per mode (eval/<split>/<mode>/seconds, tokens), every split.")


def evaluation_cost_sentence(rows: list[dict]) -> Optional[str]:
    """"Held-out evaluation took 84 s against 1 141 s of training (6.9%) and generated …" (None when not logged)."""
    train_s = sum(r["train_s"] for r in rows)
    modes = [m for m in ("sampled", "greedy") if any(f"{m}_seconds" in r for r in rows)]
    if not modes or not np.isfinite(train_s):
        return None
    eval_s = {m: sum(r.get(f"{m}_seconds", 0.0) for r in rows) for m in modes}
    eval_tokens = {m: sum(r.get(f"{m}_tokens", 0.0) for r in rows) for m in modes}
    total_s, total_tokens = sum(eval_s.values()), sum(eval_tokens.values())
    train_tokens = sum(r["train_tokens"] for r in rows)
    parts = ", ".join(f"{m} {eval_s[m]:.0f} s" for m in modes)
    diagnostics_s = sum(r["diagnostics_s"] for r in rows)
    within = (f"; of training, the end-of-step diagnostics (covariance-law monitor and probe) took "
              f"{diagnostics_s:.0f} s" if np.isfinite(diagnostics_s) and diagnostics_s > 0 else "")
    text = (f"Held-out evaluation took {total_s:.0f} s ({parts}) against {train_s:.0f} s of training "
            f"({total_s / train_s:.1%} of it), summed over the runs{within}")
    if np.isfinite(train_tokens) and train_tokens > 0:
        text += (f". Evaluation generated {total_tokens:,.0f} tokens against training's {train_tokens:,.0f} "
                 f"({total_tokens / train_tokens:.1%})")
    return text + "."


def _tokens(x: Optional[float]) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:,.0f}"


def _fmt(x: Optional[float]) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3g}"


# ------------------------------------------------------------------------------------------------ the report


def build_blocks(f: Findings) -> list[Block]:
    palette = Palette(list(dict.fromkeys(c.label for c in f.configs)))
    runs = f.runs
    blocks: list[Block] = [Paragraph(
        f"{len(runs)} run(s) in {len(f.configs)} configuration(s). Models: {', '.join(f.values_of('model'))}. "
        f"Algorithms: {', '.join(f.values_of('algorithm'))}. Estimators: {', '.join(f.values_of('estimator'))}. "
        f"Seeds: {', '.join(str(s) for s in f.values_of('seed'))}. Reported numbers use the **{f.split}** split; "
        f"selections use the **{f.selection_split}** split. Directory: {f.study.path}.")]

    blocks.append(Heading("Findings"))
    for finding in f.findings():
        blocks += [Paragraph(f"{finding.head} {finding.overview}"), Bullets(finding.clauses)]
        if finding.against_baseline:
            blocks.append(Bullets(finding.against_baseline))
        if finding.contrast:
            blocks.append(Paragraph(finding.contrast))
        blocks.append(Paragraph(finding.summary))
    if f.law is not None:
        blocks.append(Paragraph(f"**Covariance law.** {describe_scale(f.law.interval or f.law.step)}"))

    blocks.append(Heading("Held-out expected reward"))
    for estimator in f.values_of("estimator"):
        for objective_set in f.values_of("objective_set"):
            if any(r.estimator == estimator and r.objective_set == objective_set for r in runs):
                blocks.append(curves_figure(f, palette, estimator, objective_set))

    blocks += [Heading("Per-objective change"), change_table(f)]
    blocks += [Heading("Interference per algorithm"), interference_table(f)]
    against = baseline_table(f)
    if against is not None:
        blocks += [Heading(f"Against {BASELINE}"), against]
    blocks += law_blocks(f)

    weight_images = [img for key in f.pareto if (img := weights_figure(f, palette, key)) is not None]
    if weight_images:
        blocks += [Heading("Weight trajectories"), *weight_images]

    blocks.append(Heading("Pareto front"))
    pareto = pareto_figure(f, palette)
    if pareto is not None:
        blocks.append(pareto)
    blocks.append(pareto_table(f))

    costs = cost_rows(runs)
    evaluation = evaluation_cost_rows(runs)
    if costs or evaluation:
        blocks.append(Heading("Cost"))
        sentence = evaluation_cost_sentence(evaluation)
        if sentence:
            blocks.append(Paragraph(sentence))
        image = cost_figure(costs, palette) if costs else None
        blocks += ([image] if image else []) + ([cost_table(costs)] if costs else [])
        if any(k.endswith("_seconds") for r in evaluation for k in r):
            blocks.append(evaluation_cost_table(evaluation))

    if f.study.skipped:
        blocks += [Heading("Runs not included"),
                   Table(["run", "reason"], [[name, why] for name, why in f.study.skipped])]
    return blocks


def write_report(directory: Path, out: Optional[Path | str] = None) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` and ``figures/*.png`` for a study or run directory into
    ``out`` (default ``<directory>/report``); return the HTML file's path."""
    findings = Findings(load_study(directory))
    blocks = build_blocks(findings)
    out_dir = Path(out) if out is not None else Path(directory) / "report"
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for block in blocks:
        if isinstance(block, Image):
            (figures / f"{block.name}.png").write_bytes(block.png)
    title = f"moalign report: {findings.study.name}"
    (out_dir / "report.md").write_text(render_markdown(title, blocks))
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(title, blocks))
    return html_path
