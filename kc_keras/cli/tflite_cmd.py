"""`kc tflite`: export a run's models to TFLite and report parity.

TensorFlow and the converters are imported inside the command so that
`kc --help` stays fast.
"""

import logging

import click

from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

# Kept in step with converters.export.MODES, which imports TensorFlow.
MODES = ("float32", "float16", "dynamic", "ptq-int8", "qat-int8")


def parse_modes(text):
    """Return the modes of a comma-separated list ("all" for every mode).

    Raises:
        KCError: an unknown mode or an empty list.
    """
    if text.strip() == "all":
        return MODES
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes:
        raise KCError("--modes is empty; pass e.g. --modes qat-int8,float32")
    for mode in modes:
        if mode not in MODES:
            raise KCError(
                f"unknown export mode {mode!r}; expected a comma-separated "
                f"list of {', '.join(MODES)}, or all"
            )
    return tuple(dict.fromkeys(modes))


def format_table(report):
    """Return the parity report as a plain-text table."""
    lines = [
        f"{'model':<28} {'size (KiB)':>10} {'top-1':>7} {'agree':>7} "
        f"{'max |diff|':>10}"
    ]
    for entry in report["models"]:
        lines.append(
            f"{entry['name']:<28} {entry['size_bytes'] / 1024:>10.1f} "
            f"{entry['top1_accuracy']:>7.4f} {entry['top1_agreement']:>7.4f} "
            f"{entry['max_abs_diff']:>10.4f}"
        )
    return "\n".join(lines)


@click.command()
@click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder with a distilled student (RUN/student/student.keras).",
)
@click.option(
    "--modes",
    default="all",
    show_default=True,
    help="Comma-separated student export modes: float32, float16, dynamic, "
    "ptq-int8, qat-int8, or all.",
)
@click.option(
    "--qat-epochs",
    type=click.IntRange(min=0),
    default=None,
    help="Epochs of quantization-aware fine-tuning for qat-int8 "
    "[default: 2, or 1 with --quick].",
)
@click.option(
    "--uint8-input",
    is_flag=True,
    help="Full-integer models take uint8 pixels (zero point 0) instead of "
    "int8 pixels minus 128.",
)
@click.option(
    "--allow-float-ops",
    is_flag=True,
    help="Warn instead of failing when a full-integer model keeps float "
    "operators.",
)
@click.option(
    "--logits-output",
    is_flag=True,
    help="End the models at the logits instead of a softmax.",
)
@click.option(
    "--no-teachers",
    is_flag=True,
    help="Skip the generalist and specialist exports.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Smoke run: a few QAT steps and small calibration and test sets.",
)
def tflite(
    run_dir,
    modes,
    qat_epochs,
    uint8_input,
    allow_float_ops,
    logits_output,
    no_teachers,
    quick,
):
    """Export the student (and teachers) to TFLite with a parity report."""
    import dataclasses

    student_modes = parse_modes(modes)
    from converters import export
    from converters import pipeline

    options = export.ExportOptions(
        uint8_input=uint8_input,
        allow_float_ops=allow_float_ops,
        logits_output=logits_output,
    )
    overrides = {"modes": student_modes, "options": options}
    if no_teachers:
        overrides["teacher_modes"] = ()
    if quick:
        config = pipeline.TFLiteConfig.quick(**overrides)
    else:
        config = pipeline.TFLiteConfig(**overrides)
    if qat_epochs is not None:
        config = dataclasses.replace(
            config, qat=dataclasses.replace(config.qat, epochs=qat_epochs)
        )
    report = pipeline.export_run(run_dir, config)
    click.echo(format_table(report))
