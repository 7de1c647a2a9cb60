"""`kc bench`: benchmark a run's TFLite exports on this machine.

Runs the same code as `python mobile_demo/benchmark.py`, with paths taken
from the run folder: RUN/tflite/ in, RUN/bench/ out.
"""

import logging
import shlex
import sys

import click

logger = logging.getLogger(__name__)

# --quick: enough runs to check the pipeline, too few for stable figures.
QUICK_WARMUP = 2
QUICK_RUNS = 20
QUICK_LIMIT = 200


def _split(values):
    return tuple(item for value in values for item in value.split(",") if item)


@click.command()
@click.option(
    "--run",
    "run_path",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder; reads RUN/tflite/, writes RUN/bench/.",
)
@click.option(
    "--quick",
    is_flag=True,
    help=f"{QUICK_WARMUP} warm-up and {QUICK_RUNS} timed runs on "
    f"{QUICK_LIMIT} test images spread over the test set.",
)
@click.option(
    "--runtime",
    type=click.Choice(("auto", "ai_edge_litert", "tflite_runtime")),
    default="auto",
    show_default=True,
    help="TFLite runtime; auto tries ai_edge_litert, then tflite_runtime.",
)
@click.option(
    "--threads",
    multiple=True,
    help="Interpreter thread counts, e.g. 1,2,4; 1 and 2 always run.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    help="Untimed runs per system and thread count (default 10).",
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    help="Timed runs per system and thread count (default 100).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Use only N test images, evenly spaced over the test set.",
)
@click.option(
    "--modes",
    multiple=True,
    help="Student export modes, e.g. ptq-int8,qat-int8 (default: all).",
)
@click.option(
    "--ensemble-modes",
    multiple=True,
    help="Teacher export modes for the generalist and the ensembles "
    "(default ptq-int8; 'none' for students only).",
)
def bench(
    run_path, quick, runtime, threads, warmup, runs, limit, modes,
    ensemble_modes,
):  # fmt: skip
    """Compare the student with the generalist and the teacher ensembles."""
    from kc_keras.errors import KCError
    from kc_keras.run import RunDir
    from mobile_demo import benchmark

    run = RunDir(run_path)
    if not run.tflite.is_dir():
        raise KCError(
            f"{run.tflite} not found; export the models with "
            f"`kc tflite --run {run_path}` first"
        )
    try:
        thread_counts = tuple(int(t) for t in _split(threads))
    except ValueError as error:
        raise KCError(
            f"invalid --threads {' '.join(threads)!r}; pass integers such "
            "as 1,2,4"
        ) from error
    defaults = benchmark.BenchConfig
    if warmup is None:
        warmup = QUICK_WARMUP if quick else defaults.warmup
    if runs is None:
        runs = QUICK_RUNS if quick else defaults.runs
    if limit is None and quick:
        limit = QUICK_LIMIT
    ensemble = _split(ensemble_modes) or benchmark.DEFAULT_ENSEMBLE_MODES
    config = benchmark.BenchConfig(
        models=run.tflite,
        test=run.tflite / "test.npz",
        out=run.bench,
        runtime=runtime,
        threads=thread_counts or defaults.threads,
        warmup=warmup,
        runs=runs,
        limit=limit,
        modes=_split(modes) or None,
        ensemble_modes=() if ensemble == ("none",) else ensemble,
        command=shlex.join(["kc"] + sys.argv[1:]),
    )
    report = benchmark.run_benchmark(config)
    click.echo(benchmark.render_markdown(report))
