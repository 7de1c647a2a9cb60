"""`kc distill`: train the student from the run's teachers."""

import logging

import click

from kc_keras.distill.config import LOSS_KINDS
from kc_keras.distill.config import PRECISIONS
from kc_keras.distill.config import LossConfig
from kc_keras.distill.config import TrainConfig

logger = logging.getLogger(__name__)

# Names mirrored from kc_keras.models.student and kc_keras.distill.strategy,
# which import TensorFlow; `kc --help` must not. kc_keras.distill.config
# imports no TensorFlow.
HEADS = ("fc-sc", "fc-fc")
SELF_PACED_MODES = ("vertical", "class", "none")
STRATEGIES = ("none", "mirrored", "multi-worker", "tpu")
LOSS_DEFAULTS = LossConfig()
TRAIN_DEFAULTS = TrainConfig()


@click.command()
@click.option(
    "--run",
    "run_path",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder with trained teachers; the student goes to RUN/student/.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Smoke run: one epoch of a few steps.",
)
@click.option(
    "--head",
    type=click.Choice(HEADS),
    default="fc-sc",
    show_default=True,
    help="Student head: one structurally connected block per vertical "
    "(fc-sc) or a plain two-layer head (fc-fc).",
)
@click.option(
    "--self-paced",
    type=click.Choice(SELF_PACED_MODES),
    default="vertical",
    show_default=True,
    help="L2-normalised logits scaled by a learnable gamma per vertical, "
    "per class, or no scaling.",
)
@click.option(
    "--loss",
    "loss_kind",
    type=click.Choice(LOSS_KINDS),
    help="Soft loss: softmax KL at temperature T times T^2 (kl), or binary "
    "cross-entropy of sigmoid(student logits) (sigmoid). Default: "
    f"{LOSS_DEFAULTS.kind}.",
)
@click.option(
    "--temperature",
    type=float,
    help="Softmax temperature T of the teachers; must be positive. "
    f"Default: {LOSS_DEFAULTS.temperature}.",
)
@click.option(
    "--alpha",
    type=float,
    help="Weight of the hard-label cross-entropy, in [0, 1]. Default: "
    f"{LOSS_DEFAULTS.alpha}.",
)
@click.option(
    "--top-k",
    type=int,
    help="Teacher probabilities kept per image (default min(100, "
    "vertical size)); at most the smallest vertical's size.",
)
@click.option(
    "--generalist-weight",
    type=float,
    help="Weight of the generalist's soft loss; 0 skips the generalist. "
    f"Default: {LOSS_DEFAULTS.generalist_weight}.",
)
@click.option(
    "--specialist-weight",
    type=float,
    help="Weight of the soft loss of the specialist of each image's "
    f"vertical. Default: {LOSS_DEFAULTS.specialist_weight}.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    help=f"Epochs. Default: {TRAIN_DEFAULTS.epochs}.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help=f"Global batch size. Default: {TRAIN_DEFAULTS.batch_size}.",
)
@click.option(
    "--learning-rate",
    type=float,
    help="Peak Adam learning rate, decayed to 0 by a cosine schedule. "
    f"Default: {TRAIN_DEFAULTS.learning_rate}.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--cache-soft-targets",
    is_flag=True,
    help="Run each teacher once over the training split, store the top-K "
    "targets in RUN/soft_targets/ and train from them without running "
    "teachers. Steps get faster, but the targets belong to the "
    "unaugmented images: with augmentation (trio-30) they are stale, so "
    "online targets are the default.",
)
@click.option(
    "--no-distill",
    is_flag=True,
    help="Train the same student on hard labels only.",
)
@click.option(
    "--keras-distiller",
    is_flag=True,
    help="Train the student with keras.distillation.Distiller from the "
    "generalist alone.",
)
@click.option(
    "--baselines",
    is_flag=True,
    help="Also train the --no-distill and --keras-distiller students and "
    "score them.",
)
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default="none",
    show_default=True,
    help="tf.distribute strategy: one device, mirrored (local GPUs), "
    "multi-worker (reads TF_CONFIG) or tpu (untested).",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="float32",
    show_default=True,
    help="Compute precision of the student; mixed_float16 adds loss "
    "scaling. Losses stay float32.",
)
@click.option(
    "--output",
    default="student",
    show_default=True,
    help="File name of the student in RUN/student/, without .keras.",
)
def distill(
    run_path,
    quick,
    head,
    self_paced,
    loss_kind,
    temperature,
    alpha,
    top_k,
    generalist_weight,
    specialist_weight,
    epochs,
    batch_size,
    learning_rate,
    seed,
    cache_soft_targets,
    no_distill,
    keras_distiller,
    baselines,
    strategy,
    precision,
    output,
):
    """Distil the teachers into one student and score it on the test split.

    Writes RUN/student/<output>.keras and RUN/student/metrics.json (top-1
    and top-5 overall and per vertical of the student, the baselines when
    trained, the generalist and the routed ensemble) and prints a top-1
    table.
    """
    from kc_keras.distill.train import RunOptions
    from kc_keras.distill.train import distill_run
    from kc_keras.errors import KCError
    from kc_keras.models.student import StudentConfig

    if no_distill and keras_distiller:
        raise KCError(
            "--no-distill and --keras-distiller are exclusive; pass one"
        )
    mode = "distill"
    if no_distill:
        mode = "no-distill"
    elif keras_distiller:
        mode = "keras-distiller"
    loss_config = LossConfig(
        **_given(
            kind=loss_kind,
            temperature=temperature,
            alpha=alpha,
            top_k=top_k,
            generalist_weight=generalist_weight,
            specialist_weight=specialist_weight,
        )
    )
    train_config = TrainConfig(
        seed=seed,
        precision=precision,
        strategy=strategy,
        **_given(
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
        ),
    )
    student_config = StudentConfig(head=head, self_paced=self_paced)
    options = RunOptions(
        mode=mode,
        baselines=baselines,
        cache_soft_targets=cache_soft_targets,
        output=output,
        quick=quick,
    )
    metrics = distill_run(
        run_path, student_config, loss_config, train_config, options
    )
    click.echo(f"{'model':<20} {'top-1':>7} {'top-5':>7}")
    for name, report in metrics["test"].items():
        click.echo(f"{name:<20} {report['top1']:>7.4f} {report['top5']:>7.4f}")


def _given(**values):
    """Return the options the user set, so the dataclass defaults apply."""
    return {key: value for key, value in values.items() if value is not None}
