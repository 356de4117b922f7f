"""The registry of the experiments behind ``linadapt experiment NAME``, and their summary tables.

Each experiment is a module of this package with a function ``(seed, shots, quick, step) -> records``: JSON-ready
dicts ``{"experiment", "method", "seed", "shots", "metrics", "fit_seconds", ...}``. To add one, write the module
and add its line to :data:`EXPERIMENTS`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from linadapt.experiments import (
    active,
    bikeshare,
    mnist_to_animals,
    pretrained_backbone,
    rotated_mnist,
    rotation_regression,
    sinusoids,
    unsup_to_sup,
)
from linadapt.experiments.compare import selected_methods
from linadapt.experiments.source import Step

__all__ = ["EXPERIMENTS", "run_experiment", "summarize"]

EXPERIMENTS: dict[str, Callable[[int, int | None, bool, Step | None], list[dict]]] = {
    "active": active.active,
    "bikeshare": bikeshare.bikeshare,
    "mnist-to-animals": mnist_to_animals.mnist_to_animals,
    "pretrained-backbone": pretrained_backbone.pretrained_backbone,
    "rotated-mnist": rotated_mnist.records,
    "rotation-regression": rotation_regression.rotation_regression,
    "sinusoids": sinusoids.sinusoids,
    "unsup-to-sup": unsup_to_sup.unsup_to_sup,
}


def run_experiment(
    name: str,
    seeds: int = 3,
    shots: int | None = None,
    quick: bool = False,
    step: Step | None = None,
    methods: Sequence[str] | None = None,
) -> list[dict]:
    """Run experiment ``name`` for seeds 0 … seeds − 1 and return all records; ``methods``: only these
    (names from :data:`linadapt.experiments.compare.METHODS`; the data draws do not depend on the choice)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    records = []
    with selected_methods(methods):
        for seed in range(seeds):
            records += EXPERIMENTS[name](seed, shots, quick, step)
    return records


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records by (variant, shots), in order of appearance (variant is None when an experiment has none)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("variant"), r["shots"]), []).append(r)
    return groups


def summarize(records: list[dict]) -> str:
    """Markdown tables: mean ± std over seeds of every metric, and the mean fit seconds, per method — one
    table per (variant, shots) when the records have several."""
    groups = _groups(records)
    out = []
    for (variant, shots), rows in groups.items():
        if len(groups) > 1:
            out.append(f"\n{variant + ', ' if variant else ''}{shots} shots:\n")
        out.append(_summary_table(rows))
    return "\n".join(out).strip("\n")


def _summary_table(records: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in records))
    keys = list(records[0]["metrics"])
    lines = ["| method | " + " | ".join(keys) + " | fit s |", "|---" * (len(keys) + 2) + "|"]
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        cells = []
        for key in keys:
            vals = [r["metrics"][key] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        secs = statistics.mean(r["fit_seconds"] for r in rs)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {secs:.1f} |")
    return "\n".join(lines)
