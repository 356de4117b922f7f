"""``linadapt suggest``: which pool points to label next, by an adapted model's ``query`` (registered on the
command in :mod:`linadapt.app.cli`)."""

from __future__ import annotations

import csv
import io
import json
from typing import Annotated

import typer

from linadapt._files import atomic_write_text
from linadapt.app._cli_common import TRUST_HELP, console, load_adapted
from linadapt.app._cli_common import fail as _fail
from linadapt.app._cli_data import n_examples, split_names
from linadapt.io.datasets import read_dataset

__all__ = ["suggest"]


def suggest(
    adapted: Annotated[str, typer.Option(help="An adapted model written by `linadapt adapt`.")],
    pool: Annotated[str, typer.Option(help="Unlabelled candidate inputs (a data file as `adapt` reads).")],
    k: Annotated[int, typer.Option("--k", help="How many points to choose (1 ≤ k ≤ pool size).")] = 10,
    out: Annotated[str, typer.Option(help="Where to write the picks CSV (rank, index, score).")] = "picks.csv",
    target: Annotated[
        list[str] | None, typer.Option(help="CSV target column(s) of the pool, if it has them (default: as recorded).")
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option(help="An .npz pool's input arrays, comma-separated (default: those recorded by adapt)."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Override the source model recorded in the file.")] = None,
    weights: Annotated[str | None, typer.Option(help="Override the recorded weights file.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help=TRUST_HELP)] = False,
) -> None:
    """Choose the K pool points worth labelling next (greedy joint choice: regression by posterior variance,
    classification by BALD, each pick conditioning on the earlier ones); write rank, index (the pool's row, from
    0) and score per pick.

    Example: linadapt suggest --adapted run/adapted.linadapt --pool unlabelled.csv --k 20 --out picks.csv
    """
    try:
        est, recorded = load_adapted(adapted, model, weights, trust_pickle)
        names = split_names(inputs) or recorded.get("inputs")
        ds = read_dataset(pool, target or recorded.get("target"), False, recorded.get("classes"), names)
        indices, scores = est.query(ds.X, k, return_scores=True)
    except FileNotFoundError:
        _fail(f"{adapted} does not exist")
    except (ValueError, json.JSONDecodeError) as exc:
        _fail(str(exc))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["rank", "index", "score"])
    for rank, (index, score) in enumerate(zip(indices, scores), start=1):
        writer.writerow([rank, int(index), f"{score:.10g}"])
    atomic_write_text(out, buf.getvalue())
    what = "posterior variance" if getattr(est, "likelihood_", None) is None else "BALD"
    console.print(f"chose {len(indices)} of {n_examples(ds.X)} pool points by {what}", markup=False, soft_wrap=True)
    console.print(f"wrote {out}", markup=False, soft_wrap=True)
