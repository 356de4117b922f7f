"""The ``linadapt`` command line: adapt a trained network to new data, and predict with the result.

linadapt adapt --model my_nets:build --weights net.safetensors --train target.csv --test test.csv --out run/
linadapt predict --adapted run/adapted.linadapt --data new.csv --out preds.csv
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from linadapt._files import atomic_write, atomic_write_text
from linadapt._inputs import as_inputs
from linadapt._memory import resolve_memory_budget
from linadapt.app import _cli_data, _cli_results, report
from linadapt.app._cli_common import TRUST_HELP as _TRUST_HELP
from linadapt.app._cli_common import console, load_adapted
from linadapt.app._cli_common import fail as _fail
from linadapt.app.bench import (
    format_dense_table,
    format_memory_table,
    format_table,
    run_bench,
    run_dense_bench,
    run_memory_bench,
    run_neural_tangents,
)
from linadapt.app.cli_suggest import suggest
from linadapt.app.demo import run_demo
from linadapt.distributed import DistributedError
from linadapt.estimators.classifier import LinearizedClassifier
from linadapt.estimators.regressor import LinearizedRegressor
from linadapt.experiments.compare import METHODS
from linadapt.experiments.registry import EXPERIMENTS, run_experiment, summarize
from linadapt.io.datasets import DataError, read_dataset
from linadapt.io.models import ModelLoadError, load_model

app = typer.Typer(
    help="Fast adaptation of trained PyTorch networks by linearization (a GP with the network's tangent kernel).",
    no_args_is_help=True,
    add_completion=False,
)


def _launch_context() -> tuple[int, int, str | None]:
    """(rank, world size, device) under ``torchrun`` (WORLD_SIZE > 1), initialising the process group
    (NCCL with one GPU per local rank when CUDA is available, else gloo); (0, 1, None) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    device = None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _shard(n: int, rank: int, world: int) -> slice:
    """Contiguous rows of rank ``rank`` out of n (sizes differ by at most one)."""
    return slice(n * rank // world, n * (rank + 1) // world)


def _prior_row(est: LinearizedRegressor | LinearizedClassifier) -> tuple[str, str]:
    groups = getattr(est, "prior_vars_", None)
    if groups:
        return ("prior variances", ", ".join(f"{label}: {v:.4g}" for label, v in groups.items()))
    return ("prior variance", f"{est.prior_var_:.4g}")


@app.command()
def adapt(
    model: Annotated[str, typer.Option(help="A torch.export program (.pt2) or 'package.module:factory'.")],
    train: Annotated[str, typer.Option(help="Target data: .csv, .npz, a folder with X.npy/y.npy, or image folders.")],
    weights: Annotated[str | None, typer.Option(help="Weights for a factory: .safetensors or a state dict.")] = None,
    task: Annotated[
        str,
        typer.Option(
            help="regression, classification (softmax classes), binary (one output, labels 0/1), multilabel (one "
            "output per 0/1 label column), or auto (chosen from the targets and the network's outputs)."
        ),
    ] = "auto",
    params: Annotated[
        list[str] | None,
        typer.Option(help="Parameters to adapt: all, last, bias, or name globs; repeat the option for several globs."),
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option(
            help="CSV target column (default: the last); several (multilabel, multi-output regression): repeat "
            "the option or separate the names by commas."
        ),
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            help="An .npz file's arrays that are the network's keyword inputs, comma-separated or the option "
            "repeated (e.g. input_ids,attention_mask: the network is called as model(input_ids=…, "
            "attention_mask=…)); default: the array X."
        ),
    ] = None,
    test: Annotated[str | None, typer.Option(help="Data to predict; with targets, metrics are reported.")] = None,
    out: Annotated[str, typer.Option(help="Output folder.")] = "linadapt-out",
    baselines: Annotated[
        bool, typer.Option(help="With labelled --test data, also fine-tune (last layer, all weights) to compare.")
    ] = True,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help=_TRUST_HELP)] = False,
    prior_groups: Annotated[
        str | None,
        typer.Option(
            help="One prior variance per group of weights, learned by the evidence: 'layers', 'tensors', or "
            "comma-separated name patterns, one group each (the rest forming a group), e.g. 'fc.*'."
        ),
    ] = None,
    noise: Annotated[
        str, typer.Option(help="Regression: one noise variance (shared) or one per output (per-output).")
    ] = "shared",
    memory_budget: Annotated[
        str,
        typer.Option(help="Memory linadapt's arrays may take, e.g. 4GiB or 512MiB; auto: min(2 GiB, 1/4 available)."),
    ] = "auto",
    hyperprior: Annotated[
        str,
        typer.Option(
            help="The evidence search's hyperprior: default (regression: a weak prior on the noise; classification: "
            "s² kept off 0) or none (the evidence alone)."
        ),
    ] = "default",
) -> None:
    """Fit the linearized GP of MODEL on the target data; write OUT/adapted.linadapt, OUT/report.html and, with
    --test, OUT/predictions.csv (and a comparison with the source network and fine-tuning when it has targets).

    Example: linadapt adapt --model my_nets:build --weights net.safetensors --train target.csv --test test.csv

    Data-parallel: torchrun --nproc-per-node N -m linadapt adapt ... — every process reads the data file and
    fits on its block of rows (see docs/distributed.md); process 0 writes the outputs.
    """
    if task not in _cli_data.TASKS:  # checked first: a typo should not cost a fit
        _fail(f"--task must be auto, regression, classification, binary or multilabel, got {task!r}")
    if noise not in ("shared", "per-output", "per_output"):
        _fail(f"--noise must be shared or per-output, got {noise!r}")
    noise = noise.replace("-", "_")
    if hyperprior not in ("default", "none"):
        _fail(f"--hyperprior must be default or none, got {hyperprior!r}")
    target_names, input_names = target or None, _cli_data.split_names(inputs)
    groups_spec: str | list[str] | None = prior_groups
    if prior_groups is not None and prior_groups not in ("layers", "tensors"):
        groups_spec = [p.strip() for p in prior_groups.split(",") if p.strip()]
        if not groups_spec or not all(any(ch in p for ch in ".*?[") for p in groups_spec):
            _fail(
                f"--prior-groups must be layers, tensors or comma-separated parameter name patterns "
                f"(such as 'fc.*'), got {prior_groups!r}"
            )
    try:
        budget = resolve_memory_budget(memory_budget)
    except ValueError as exc:
        _fail(f"--memory-budget: {exc}")
    rank, world, device = _launch_context()
    if rank != 0:
        console.quiet = True
    try:
        net = load_model(model, weights, trust_pickle)
        data = read_dataset(train, target_names, inputs=input_names)
        # the test file's target column(s), if present, are the training file's (by name); image class folders are
        # labelled by the training classes' names
        classes = data.classes or None
        test_data = read_dataset(test, target_names or data.target, False, classes, input_names) if test else None
    except (ModelLoadError, DataError) as exc:
        _fail(str(exc))
    assert data.y is not None
    spec: str | list[str] = (
        params[0] if params and len(params) == 1 and params[0] in ("all", "last", "bias") else (params or "all")
    )
    n = _cli_data.n_examples(data.X)
    shape = _cli_data.describe_inputs(data.X)
    try:
        first = _cli_data.network_outputs(net, as_inputs(_cli_data.take(data.X, slice(0, 1))))
        n_outputs = int(np.prod(first.shape[1:]) or 1)
    except Exception as exc:
        _fail(f"the model cannot run on the training inputs of shape {shape}: {type(exc).__name__}: {exc}")
    chosen = _cli_data.choose_task(task, data.y, n_outputs)
    if noise != "shared" and chosen != "regression":
        _fail(f"--noise applies to regression; this is a {chosen} task")
    try:
        y = _cli_data.task_targets(chosen, data.y, n_outputs, train)
    except ValueError as exc:
        _fail(str(exc))
    est_cls = LinearizedRegressor if chosen == "regression" else LinearizedClassifier
    # the likelihood the task names (not the estimator's own choice): the report and predictions.csv follow it
    likelihoods = {"classification": "categorical", "binary": "bernoulli", "multilabel": "multilabel"}
    extra: dict = {"likelihood": likelihoods[chosen]} if chosen != "regression" else {}
    if noise != "shared":
        extra["noise"] = noise
    if groups_spec is not None:
        extra["prior_groups"] = groups_spec
    if hyperprior == "none":
        extra["hyperprior"] = None
    est = est_cls(net, params=spec, distributed=world > 1, device=device, memory_budget=budget, **extra)
    rows = _shard(n, rank, world)
    if world > 1 and n < world:
        _fail(f"{train} has {n} examples: fewer than the {world} processes")
    where = f" on {world} processes" if world > 1 else ""
    try:
        with console.status(f"fitting the linearized {chosen} model on {n} examples{where} …"):
            t = time.perf_counter()
            est.fit(_cli_data.take(data.X, rows), y[rows])
            est.fit_seconds_ = time.perf_counter() - t
        log_evidence = est.log_marginal_likelihood_value_  # may need the (sharded) training data
    except (ValueError, DistributedError) as exc:
        _fail(str(exc))
    os.makedirs(out, exist_ok=True)
    reference = json.dumps(
        {
            "model": model,
            "weights": os.path.abspath(weights) if weights else None,
            "target": data.target,
            "inputs": input_names,  # named .npz arrays (keyword inputs), read again by predict and suggest
            "classes": data.classes or None,  # image class folders: test folders are matched by these names
        }
    )
    est.save(os.path.join(out, "adapted.linadapt"), model_reference=reference)  # collective when distributed
    pred = None
    if test_data is not None:
        try:
            pred = _cli_results.predict(est, test_data.X)  # every process takes part (products over the sharded data)
        except ValueError as exc:
            _fail(f"predicting on {test}: {exc}")
    if world > 1:
        from linadapt.distributed import shutdown

        shutdown()  # a barrier, then destroy_process_group
        if rank != 0:
            return
    table = Table(title=f"linadapt {chosen}")
    table.add_column("quantity")
    table.add_column("value")
    summary = [
        ("training data", f"{train} ({n} examples)"),
        ("input shape" if input_names is None else "inputs (shape per example)", shape),
        _cli_data.target_summary(chosen, y, n_outputs),
        (
            "test data",
            f"{test} ({_cli_data.n_examples(test_data.X)} examples)" if test_data is not None else "none",
        ),
        ("model", model + (f" + {weights}" if weights else "")),
        ("adapted parameters", str(est.linearization_.num_params)),
        _prior_row(est),
    ]
    if world > 1:
        summary.insert(1, ("processes", f"{world} (torch.distributed, examples per process {est._sharding.counts})"))
    if chosen == "regression":
        sig2 = np.atleast_1d(est.noise_var_)
        summary.append((f"noise variance{'s (per output)' * (sig2.size > 1)}", ", ".join(f"{v:.4g}" for v in sig2)))
    summary.append(("log evidence", f"{log_evidence:.4f}"))
    for row in summary:
        table.add_row(*row)
    sections = [("Data and hyperparameters", report.table_html(["quantity", "value"], summary))]
    if test_data is not None:
        assert pred is not None
        try:
            if test_data.y is not None:
                comparison, figure = _cli_results.comparison(
                    pred, est.fit_seconds_, net, data, y, test_data, baselines, chosen
                )
                sections.append(("Comparison on the test data", comparison))
            elif len(pred) == 2 and input_names is None:
                figure = report.prediction_figure(test_data.X, None, *pred)
            else:
                figure = None
            if figure is not None:
                sections.append(("Predictions", report.figure_html(figure, "predictions")))
        except ValueError as exc:
            _fail(f"comparing on {test}: {exc}")
        _cli_results.write_csv(os.path.join(out, "predictions.csv"), *_cli_results.columns(pred, chosen), data.classes)
        for name, value in _cli_results.scores(pred, test_data.y, chosen).items():
            table.add_row(f"test {name}", f"{value:.4f}")
    report.write_report(os.path.join(out, "report.html"), f"linadapt: {chosen} adaptation of {model}", sections)
    Console().print(table)
    written = ["adapted.linadapt", "report.html"] + (["predictions.csv"] if test_data is not None else [])
    console.print(f"wrote {', '.join(os.path.join(out, w) for w in written)}", markup=False, soft_wrap=True)


@app.command()
def predict(
    adapted: Annotated[str, typer.Option(help="An adapted model written by `linadapt adapt`.")],
    data: Annotated[str, typer.Option(help="Inputs to predict (targets optional).")],
    out: Annotated[str, typer.Option(help="Where to write the predictions CSV.")] = "predictions.csv",
    target: Annotated[
        list[str] | None,
        typer.Option(help="CSV target column(s), if present (default: those recorded by adapt)."),
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option(help="An .npz file's input arrays, comma-separated (default: those recorded by adapt)."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Override the source model recorded in the file.")] = None,
    weights: Annotated[str | None, typer.Option(help="Override the recorded weights file.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help=_TRUST_HELP)] = False,
) -> None:
    """Predict with an adapted model, one row per example: mean/std (regression), proba_k/label
    (classification, binary), proba_k/label_k (multilabel); see docs/usage.md for the columns.

    Example: linadapt predict --adapted run/adapted.linadapt --data new.csv --out preds.csv
    """
    try:
        est, recorded = load_adapted(adapted, model, weights, trust_pickle)
        names = _cli_data.split_names(inputs) or recorded.get("inputs")
        targets = target or recorded.get("target")
        ds = read_dataset(data, targets, False, recorded.get("classes"), names)
        if ds.y is not None and ds.classes and not recorded.get("classes"):
            console.print(
                f"warning: {adapted} records no class names (written by an older linadapt or from Python): the "
                f"class folders of {data} are labelled by their sorted position ({', '.join(ds.classes)} → 0, 1, …)",
                markup=False,
                soft_wrap=True,
            )
        task = _cli_data.task_of(est)
        pred = _cli_results.predict(est, ds.X)
        cols, values = _cli_results.columns(pred, task)
        scores = _cli_results.scores(pred, ds.y, task)
    except FileNotFoundError:
        _fail(f"{adapted} does not exist")
    except (ValueError, json.JSONDecodeError) as exc:
        _fail(str(exc))
    _cli_results.write_csv(out, cols, values, classes=recorded.get("classes"))
    for name, value in scores.items():
        console.print(f"{name}: {value:.4f}", markup=False, soft_wrap=True)
    console.print(f"wrote {out} ({values.shape[0]} rows)", markup=False, soft_wrap=True)


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Output folder for report.html and results.json.")] = "linadapt-demo",
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="A reduced run for smoke tests (about 15 s on 2 cores; the full demo takes about a minute).",
        ),
    ] = False,
) -> None:
    """Adapt networks to shifted tasks (sinusoid regression; upright → rotated MNIST classification) next to
    fine-tuning; print the results and write OUT/report.html and OUT/results.json. Needs no arguments.

    Example: linadapt demo --out linadapt-demo
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("starting", total=None)
        try:
            records = run_demo(out, quick=quick, step=lambda msg: bar.update(task, description=msg))
        except ImportError as exc:
            _fail(str(exc))
    for experiment in dict.fromkeys(r["experiment"] for r in records):
        rows = [r for r in records if r["experiment"] == experiment]
        keys = list(rows[0]["metrics"])
        table = Table(title=experiment)
        for col in ("method", *keys, "fit s"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["method"], *[f"{r['metrics'][k]:.3f}" for k in keys], f"{r['fit_seconds']:.2f}")
        Console().print(table)
    console.print(
        f"wrote {os.path.join(out, 'report.html')} and {os.path.join(out, 'results.json')}",
        markup=False,
        soft_wrap=True,
    )


@app.command()
def experiment(
    name: Annotated[
        str,
        typer.Argument(help=f"The experiment: {', '.join(sorted(EXPERIMENTS))}."),
    ],
    seeds: Annotated[int, typer.Option(help="Seeds 0 … seeds−1 (each retrains the source network).")] = 3,
    shots: Annotated[
        int | None,
        typer.Option(help="Labelled target examples (per class for classification; default: the experiment's set)."),
    ] = None,
    output: Annotated[str | None, typer.Option(help="Write the records as JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A reduced run for smoke tests.")] = False,
    plot: Annotated[
        str | None, typer.Option(help="Write a plot of the error against the shots (default: OUTPUT with .png).")
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help=f"Comma-separated methods to run (default: all): {', '.join(METHODS)}. The same seeds draw "
            "the same data, so the records can be merged with another run's."
        ),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="Merge into OUTPUT's existing records (records of the same method, seed and shots are replaced).",
        ),
    ] = False,
) -> None:
    """Run one of the paper-style experiments and print mean ± std over seeds per method.

    Example: linadapt experiment sinusoids --seeds 5 --output sinusoids.json
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if name not in EXPERIMENTS:
        _fail(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}")
    if merge and not output:
        _fail("--merge needs --output (the file to merge into)")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(name, total=None)
        try:
            chosen = None if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
            records = run_experiment(
                name, seeds, shots, quick, step=lambda msg: bar.update(task, description=msg), methods=chosen
            )
        except (ValueError, ImportError) as exc:
            _fail(str(exc))
    if not records:
        _fail(f"no records: none of the methods {methods!r} applies to the {name} experiment")
    if merge:
        records = _merge_records(output, records)
    print(summarize(records))
    if output:
        atomic_write_text(output, json.dumps(records, indent=1))
        console.print(f"wrote {output}", markup=False, soft_wrap=True)
    plot = plot or (os.path.splitext(output)[0] + ".png" if output else None)
    if plot:
        metric = "accuracy" if "accuracy" in records[0]["metrics"] else "rmse"
        fig = report.shots_figure(records, metric, name)

        atomic_write(plot, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        console.print(f"wrote {plot}", markup=False, soft_wrap=True)


def _merge_records(path: str | None, new: list[dict]) -> list[dict]:
    """The records in JSON file ``path`` (if it exists) with those of ``new``'s (experiment, method, seed, shots,
    variant) replaced by ``new``'s, followed by ``new``."""
    if path is None or not os.path.exists(path):
        return new
    try:
        with open(path) as f:
            old = json.load(f)
        if not isinstance(old, list) or not all(isinstance(r, dict) and "method" in r for r in old):
            raise ValueError("not a list of experiment records")
    except (OSError, ValueError) as exc:
        _fail(f"cannot merge into {path}: {exc}")

    def key(r: dict) -> tuple:
        return (r.get("experiment"), r.get("method"), r.get("seed"), r.get("shots"), r.get("variant"))

    replaced = {key(r) for r in new}
    return [r for r in old if key(r) not in replaced] + new


@app.command()
def bench(
    reps: Annotated[int, typer.Option(help="Interleaved repetitions (medians are reported).")] = 9,
    n: Annotated[int, typer.Option(help="Inputs per product.")] = 1024,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    dense: Annotated[bool, typer.Option(help="Also time the dense NTK (full at n = 256, trace at n = 1024).")] = True,
    plain: Annotated[
        bool, typer.Option(help="In the dense table, also time the per-example Jacobian contraction (slow).")
    ] = True,
    memory: Annotated[
        bool, typer.Option(help="Also measure peak memory per product (each in a fresh process).")
    ] = True,
    neural_tangents: Annotated[
        bool,
        typer.Option(
            help="With the dense table, also run neural-tangents' (JAX) on the same models, under --jax-python."
        ),
    ] = True,
    jax_python: Annotated[
        str | None,
        typer.Option(
            help="Python with jax 0.4.25 and neural-tangents 0.6.5 (default: $LINADAPT_JAX_PYTHON, then "
            ".venv-bench-jax/bin/python; benchmarks/make_jax_venv.sh builds it)."
        ),
    ] = None,
) -> None:
    """Time NTK products and dense kernels against one forward+backward pass of the same model (ratios).

    Example: linadapt bench --reps 9 --n 1024
    """
    with console.status("timing kernel products …"):
        rows = run_bench(reps, n, threads)
    print(format_table(rows, reps, n, threads))
    if dense:
        dense_reps = max(1, min(reps, 5))
        with console.status("timing dense kernels …"):
            drows = run_dense_bench(dense_reps, threads, plain)
        print()
        print(format_dense_table(drows, dense_reps, threads))
        if neural_tangents:
            with console.status("timing neural-tangents (JAX) on the same models …"):
                _, text = run_neural_tangents(jax_python, dense_reps, threads)
            print()
            print(text)
    if memory:
        with console.status("measuring peak memory …"):
            mrows = run_memory_bench(n, threads)
        print()
        print(format_memory_table(mrows, n))


app.command()(suggest)  # linadapt suggest (app/cli_suggest.py)


def main() -> None:
    """Entry point of the ``linadapt`` command."""
    app(prog_name="linadapt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
