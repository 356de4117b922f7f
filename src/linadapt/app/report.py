"""Self-contained HTML reports: tables and matplotlib figures embedded as base64 PNG (one file, no assets)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import numpy as np

from linadapt import metrics
from linadapt._files import atomic_write_text

__all__ = [
    "figure_html",
    "prediction_figure",
    "regression_band_figure",
    "reliability_figure",
    "shots_figure",
    "table_html",
    "write_report",
]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; line-height: 1.45 }
h1 { font-size: 1.6rem } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd }
table { border-collapse: collapse; margin: 0.8rem 0 } th, td { padding: 0.25rem 0.7rem; border-bottom: 1px solid #eee;
text-align: right } th:first-child, td:first-child { text-align: left } img { max-width: 100%; margin: 0.5rem 0 }
p.note { color: #555; font-size: 0.92rem }
"""


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_html(fig, alt: str) -> str:
    """An <img> holding the figure as an embedded PNG (the figure is closed)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table_html(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; floats are shown with 4 significant digits."""

    def cell(v: object) -> str:
        return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def regression_band_figure(
    x: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    x_train: np.ndarray,
    y_train: np.ndarray,
    curves: dict[str, np.ndarray] | None = None,
    title: str = "",
):
    """Predictive mean with ±2 std band over a 1-D input (sorted by x), the training points and other curves."""
    plt = _plt()
    order = np.argsort(x)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.fill_between(x[order], (mean - 2 * std)[order], (mean + 2 * std)[order], alpha=0.25, label="linadapt ± 2 std")
    ax.plot(x[order], mean[order], lw=2, label="linadapt mean")
    for name, values in (curves or {}).items():
        ax.plot(x[order], values[order], lw=1.2, ls="--", label=name)
    ax.scatter(x_train, y_train, c="k", s=22, zorder=5, label="target training points")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    return fig


def reliability_figure(probas: dict[str, np.ndarray], y: np.ndarray, n_bins: int = 15):
    """Reliability diagram (accuracy vs confidence per bin) and confidence histogram for several predictors."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot([0, 1], [0, 1], color="0.6", ls=":", label="perfect calibration")
    for name, proba in probas.items():
        bins = metrics.reliability_bins(proba, y, n_bins)
        keep = bins["count"] > 0
        ece = metrics.expected_calibration_error(proba, y, n_bins)
        ax1.plot(bins["confidence"][keep], bins["accuracy"][keep], marker="o", ms=3, label=f"{name} (ECE {ece:.3f})")
        ax2.hist(proba.max(axis=1), bins=bins["edges"], histtype="step", lw=1.5, label=name)
    ax1.set_xlabel("confidence (top-class probability)")
    ax1.set_ylabel("accuracy")
    ax1.set_title("reliability diagram")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("test examples")
    ax2.set_title("confidence histogram")
    ax2.legend(fontsize=7)
    return fig


def shots_figure(records: list[dict], metric: str, title: str = ""):
    """``metric`` against the number of target points per method, one panel per variant of the experiment
    (records as written by ``linadapt experiment``): the mean over seeds with a band of ± one standard error
    of that mean (std/√seeds) — never below the smallest value over the seeds (with dᵢ = xᵢ − min ≥ 0,
    (Σd)² ≥ Σd² gives mean − s.e. ≥ min), so a positive metric keeps a positive band on a log axis, which
    ± one std did not. An experiment run at a single budget is drawn as one row per method instead: the mean
    with its ± one standard error bar."""
    plt = _plt()
    variants = list(dict.fromkeys(r.get("variant") for r in records))
    single = len({r["shots"] for r in records}) == 1
    methods_all = list(dict.fromkeys(r["method"] for r in records))
    size = (6.5, 0.9 + 0.32 * len(methods_all)) if single else (5.5, 3.8)
    fig, axes = plt.subplots(1, len(variants), figsize=(size[0] * len(variants), size[1]), squeeze=False)
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    for ax, variant in zip(axes[0], variants):
        rows = [r for r in records if r.get("variant") == variant]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for i, method in enumerate(methods):
            by_shots: dict[int, list[float]] = {}
            for r in rows:
                if r["method"] == method:
                    by_shots.setdefault(r["shots"], []).append(r["metrics"][metric])
            shots = sorted(by_shots)
            values = [np.asarray(by_shots[k], dtype=float) for k in shots]
            mean = np.array([v.mean() for v in values])
            se = np.array([v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0 for v in values])
            # ten hues; methods beyond the tenth reuse them lighter and dashed
            style = "-" if i % 20 < 10 else "--"
            colour = colours[(2 * i) % 20 + (i % 20 >= 10)]
            if single:
                ax.errorbar(mean, [i], xerr=se, fmt="o", ms=4, color=colour, capsize=3, label=method)
            else:
                (line,) = ax.plot(shots, mean, style, marker="o", ms=3, label=method, color=colour)
                ax.fill_between(shots, mean - se, mean + se, color=line.get_color(), alpha=0.12)
        heading = f"{title} {variant}" if variant else title
        # what a shot is: the records may say (the active experiment counts labels over all classes)
        unit = rows[0].get("shots_unit") or ("labels per class" if metric in ("accuracy", "ece") else "target points")
        if single:
            ax.set_yticks(range(len(methods)), methods, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(f"{metric} at {rows[0]['shots']} {unit} (mean ± s.e. over seeds)")
            ax.grid(axis="x", color="0.9")
            ax.set_title(heading)
            continue
        ax.set_xlabel(unit)
        ax.set_ylabel(f"{metric} (mean ± s.e. over seeds)")
        ax.set_title(heading)
        if metric in ("rmse", "nll") and all(r["metrics"][metric] > 0 for r in rows):
            ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def write_report(path: str, title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> None:
    """Write a one-file HTML report (sections: (heading, HTML body)); replaced atomically."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
    if intro:
        parts.append(f"<p>{intro}</p>")
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    atomic_write_text(path, "".join(parts))


def _projection(X: np.ndarray) -> tuple[np.ndarray, str]:
    """A 1-D coordinate for plotting: the input itself if scalar, else the first principal component."""
    flat = X.reshape(X.shape[0], -1).astype(np.float64)
    if flat.shape[1] == 1:
        return flat[:, 0], "x"
    centred = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[0], "first principal component of the inputs"


def prediction_figure(X: np.ndarray, y: np.ndarray | None, mean: np.ndarray, std: np.ndarray, title: str = ""):
    """Predictive mean ± 2 std of the first output. One-dimensional inputs: a band along x, with the targets
    if known. Several input dimensions (no order along which a band would mean anything): with targets,
    predicted against observed (each test point with its ± 2 std bar, the diagonal for reference); without,
    each point's mean and bar along the first principal component of the inputs."""
    plt = _plt()
    t, label = _projection(X)
    m, s = mean.reshape(mean.shape[0], -1)[:, 0], std.reshape(std.shape[0], -1)[:, 0]
    observed = None if y is None else y.reshape(y.shape[0], -1)[:, 0]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if label == "x":
        order = np.argsort(t)
        ax.fill_between(t[order], (m - 2 * s)[order], (m + 2 * s)[order], alpha=0.25, label="± 2 std")
        ax.plot(t[order], m[order], lw=1.5, label="predictive mean")
        if observed is not None:
            ax.scatter(t, observed, s=8, c="k", label="targets")
        ax.set_xlabel(label)
        ax.set_ylabel("output 0")
    elif observed is not None:
        ax.errorbar(observed, m, yerr=2 * s, fmt="o", ms=3, lw=0.8, alpha=0.7, label="predictive mean ± 2 std")
        lo, hi = float(min(observed.min(), (m - 2 * s).min())), float(max(observed.max(), (m + 2 * s).max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", ls=":", label="predicted = observed")
        ax.set_xlabel("observed (output 0)")
        ax.set_ylabel("predicted (output 0)")
    else:
        ax.errorbar(t, m, yerr=2 * s, fmt="o", ms=3, lw=0.8, alpha=0.7, label="predictive mean ± 2 std")
        ax.set_xlabel(label)
        ax.set_ylabel("output 0")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig
