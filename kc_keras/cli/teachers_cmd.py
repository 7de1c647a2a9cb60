"""`kc teachers`: train the generalist and one specialist per vertical."""

import logging
import time

import click

from kc_keras.data import DATASETS
from kc_keras.models.backbones import BACKBONES

logger = logging.getLogger(__name__)

QUICK_STEPS = 5


@click.command()
@click.option(
    "--dataset",
    "dataset_name",
    required=True,
    type=click.Choice(DATASETS),
    help="Dataset to train on.",
)
@click.option(
    "--run",
    "run_path",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder; models go to RUN/teachers/.",
)
@click.option(
    "--path",
    type=click.Path(exists=True, file_okay=False),
    help="image-folder root: PATH/<class>/<image>.",
)
@click.option(
    "--taxonomy",
    "taxonomy_file",
    type=click.Path(exists=True, dir_okay=False),
    help="image-folder taxonomy file (CSV class,vertical or JSON). Without "
    "it, verticals are clustered from the generalist's confusions.",
)
@click.option(
    "--num-classes",
    type=click.IntRange(min=2),
    help="synthetic only: number of classes (default 30).",
)
@click.option(
    "--verticals",
    "--num-verticals",
    "verticals",
    type=click.IntRange(min=1),
    help="Number of verticals: of the synthetic dataset, or of the "
    "clustering when an image folder has no taxonomy (default about "
    "sqrt(classes)).",
)
@click.option(
    "--cluster-method",
    type=click.Choice(("spectral", "agglomerative")),
    default="spectral",
    show_default=True,
    help="Clustering method that derives verticals without a taxonomy.",
)
@click.option(
    "--backbone",
    type=click.Choice(BACKBONES),
    help="Backbone of every teacher (default: the dataset's, "
    "small-cnn-flatten for kanji-2136 and small-cnn otherwise).",
)
@click.option(
    "--filters",
    type=click.IntRange(min=1),
    help="small-cnn filters of the first block (default 32).",
)
@click.option(
    "--blocks",
    type=click.IntRange(min=1),
    help="small-cnn blocks (default 2).",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False),
    help="Local weights file of a keras.applications backbone.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    help="Generalist training epochs (default 10).",
)
@click.option(
    "--specialist-epochs",
    type=click.IntRange(min=1),
    help="Fine-tuning epochs of each specialist (default 2).",
)
@click.option(
    "--specialist-steps",
    type=click.IntRange(min=1),
    help="Batches per specialist epoch (default 200).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Images per training batch (default 128).",
)
@click.option(
    "--dustbin-fraction",
    type=click.FloatRange(min=0),
    help="Other verticals' images per image of a specialist's vertical "
    "(default 0.5).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the data splits, weight initialisation and dustbin sampling.",
)
@click.option(
    "--quick",
    is_flag=True,
    help=f"Smoke run: a data subset, {QUICK_STEPS} steps per epoch.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Retrain every teacher, even in a run folder of another dataset.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="image-folder: fail on an unreadable image instead of skipping it.",
)
def teachers(
    dataset_name,
    run_path,
    path,
    taxonomy_file,
    num_classes,
    verticals,
    cluster_method,
    backbone,
    filters,
    blocks,
    weights,
    epochs,
    specialist_epochs,
    specialist_steps,
    batch_size,
    dustbin_fraction,
    seed,
    quick,
    overwrite,
    strict,
):
    """Train the teachers and write them to RUN/teachers/.

    Prints a table of test accuracies to stdout. RUN/teachers/metrics.json
    contains every figure.
    """
    import dataclasses

    from kc_keras.data import load_dataset
    from kc_keras.models import backbones
    from kc_keras.models import teachers as teachers_lib

    spec = backbones.BackboneSpec(
        name=backbone or backbones.BackboneSpec.name, weights=weights
    )
    spec = dataclasses.replace(
        spec,
        **_given(filters=filters, blocks=blocks),
    )
    config = teachers_lib.TeacherConfig(backbone=spec, seed=seed)
    config = dataclasses.replace(
        config,
        **_given(
            epochs=epochs,
            specialist_epochs=specialist_epochs,
            specialist_steps_per_epoch=specialist_steps,
            batch_size=batch_size,
            dustbin_fraction=dustbin_fraction,
        ),
    )
    if quick:
        config = dataclasses.replace(
            config,
            epochs=epochs or 1,
            specialist_epochs=specialist_epochs or 1,
            steps_per_epoch=QUICK_STEPS,
        )

    dataset = load_dataset(
        dataset_name,
        path=path,
        taxonomy_file=taxonomy_file,
        quick=quick,
        seed=seed,
        strict=strict,
        num_classes=num_classes,
        num_verticals=verticals if dataset_name == "synthetic" else None,
    )
    if backbone is None:
        config = dataclasses.replace(
            config,
            backbone=dataclasses.replace(
                config.backbone, name=dataset.backbone
            ),
        )
    cluster = teachers_lib.ClusterConfig(
        num_verticals=verticals, method=cluster_method
    )
    start = time.monotonic()
    metrics = teachers_lib.train_teachers(
        dataset, run_path, config, overwrite=overwrite, cluster=cluster
    )
    logger.info(
        "teachers done in %.0f s: generalist top-1 %.4f, routed ensemble "
        "top-1 %.4f",
        time.monotonic() - start,
        metrics["models"]["generalist"]["top1"],
        metrics["ensembles"]["routed"]["top1"],
    )
    from kc_keras.evaluation import format_table

    click.echo(format_table(metrics))


def _given(**options):
    """Return the options that were passed (not None)."""
    return {key: value for key, value in options.items() if value is not None}
