"""`kc data`: inspect the dataset sources."""

import json
import logging

import click
import numpy as np

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
# Above this many classes, `describe` lists only the smallest and largest
# classes unless --all-classes is given.
MAX_LISTED_CLASSES = 100
EXTREME_CLASSES = 5


@click.group()
def data():
    """Inspect datasets."""


def summarize(dataset):
    """Return a JSON-serialisable summary of a dataset's sizes.

    Args:
        dataset: a `Dataset`.

    Returns:
        A dict with the shape, the class and image counts per split, per
        vertical and per class, and the train-split imbalance.
    """
    taxonomy = dataset.taxonomy
    per_class = {
        split: dataset.class_counts(split).tolist() for split in SPLIT_NAMES
    }
    class_vertical = np.array(taxonomy.class_vertical)
    verticals = []
    for v, name in enumerate(taxonomy.vertical_names):
        members = class_vertical == v
        entry = {"name": name, "classes": int(members.sum())}
        for split in SPLIT_NAMES:
            entry[split] = int(np.array(per_class[split])[members].sum())
        verticals.append(entry)
    train_class = np.array(per_class["train"])
    train_vertical = np.array([entry["train"] for entry in verticals])
    return {
        "name": dataset.name,
        "spec": dataset.spec,
        "image_shape": list(dataset.preprocessing.input_shape),
        "num_classes": taxonomy.num_classes,
        "num_verticals": taxonomy.num_verticals,
        "taxonomy_provisional": dataset.taxonomy_provisional,
        "images": {split: len(dataset.split(split)) for split in SPLIT_NAMES},
        "verticals": verticals,
        "classes": [
            {
                "name": taxonomy.class_names[c],
                "vertical": taxonomy.vertical_names[class_vertical[c]],
                **{split: per_class[split][c] for split in SPLIT_NAMES},
            }
            for c in range(taxonomy.num_classes)
        ],
        "imbalance": {
            "class_min": int(train_class.min()),
            "class_max": int(train_class.max()),
            "class_min_name": taxonomy.class_names[int(train_class.argmin())],
            "class_max_name": taxonomy.class_names[int(train_class.argmax())],
            "vertical_min": int(train_vertical.min()),
            "vertical_max": int(train_vertical.max()),
            "vertical_min_name": verticals[int(train_vertical.argmin())][
                "name"
            ],
            "vertical_max_name": verticals[int(train_vertical.argmax())][
                "name"
            ],
        },
    }


def format_summary(summary, all_classes=False):
    """Return the text report of `summarize`'s output."""
    lines = [
        f"dataset: {summary['name']}",
        "image shape: " + "x".join(str(n) for n in summary["image_shape"]),
        f"classes: {summary['num_classes']}",
        f"verticals: {summary['num_verticals']}"
        + (
            " (provisional: derived later from a confusion matrix)"
            if summary["taxonomy_provisional"]
            else ""
        ),
        "images: "
        + ", ".join(
            f"{split} {summary['images'][split]}" for split in SPLIT_NAMES
        ),
        "",
        "per vertical (classes, train/validation/test images):",
    ]
    for entry in summary["verticals"]:
        lines.append(
            f"  {entry['name']}: {entry['classes']} classes, "
            + format_counts(entry)
        )
    classes = summary["classes"]
    lines.append("")
    if all_classes or len(classes) <= MAX_LISTED_CLASSES:
        lines.append("per class (vertical, train/validation/test images):")
        listed_classes = classes
    else:
        lines.append(
            f"per class, the {EXTREME_CLASSES} smallest and largest by "
            "train images (--all-classes lists every class):"
        )
        ordered = sorted(classes, key=lambda entry: entry["train"])
        listed_classes = ordered[:EXTREME_CLASSES] + ordered[-EXTREME_CLASSES:]
    for entry in listed_classes:
        lines.append(
            f"  {entry['name']} ({entry['vertical']}): " + format_counts(entry)
        )
    imbalance = summary["imbalance"]
    lines += [
        "",
        "imbalance (train images):",
        f"  per class: min {imbalance['class_min']} "
        f"({imbalance['class_min_name']}), max {imbalance['class_max']} "
        f"({imbalance['class_max_name']}), ratio "
        f"{ratio(imbalance['class_max'], imbalance['class_min'])}",
        f"  per vertical: min {imbalance['vertical_min']} "
        f"({imbalance['vertical_min_name']}), max "
        f"{imbalance['vertical_max']} ({imbalance['vertical_max_name']}), "
        f"ratio {ratio(imbalance['vertical_max'], imbalance['vertical_min'])}",
    ]
    return "\n".join(lines)


def format_counts(entry):
    return "/".join(str(entry[split]) for split in SPLIT_NAMES)


def ratio(largest, smallest):
    return f"{largest / smallest:.1f}" if smallest else "inf"


@data.command()
@click.option(
    "--dataset",
    "name",
    default="trio-30",
    show_default=True,
    help="Dataset name: trio-30, kanji-2136, image-folder or synthetic.",
)
@click.option(
    "--path",
    type=click.Path(),
    default=None,
    help="image-folder root with one subfolder of images per class.",
)
@click.option(
    "--taxonomy",
    "taxonomy_file",
    type=click.Path(),
    default=None,
    help="image-folder taxonomy: CSV `class,vertical` or JSON.",
)
@click.option(
    "--image-size",
    type=int,
    default=None,
    help="image-folder image height and width in pixels (default 64).",
)
@click.option(
    "--num-classes",
    type=int,
    default=None,
    help="synthetic: number of classes (default 30).",
)
@click.option(
    "--num-verticals",
    type=int,
    default=None,
    help="synthetic: number of verticals (default about sqrt of classes).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Split seed."
)
@click.option(
    "--strict",
    is_flag=True,
    help="image-folder: fail on an unreadable image instead of skipping it.",
)
@click.option("--quick", is_flag=True, help="Describe the quick subset.")
@click.option(
    "--all-classes",
    is_flag=True,
    help=f"List every class even above {MAX_LISTED_CLASSES} classes.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON instead of text."
)
def describe(
    name,
    path,
    taxonomy_file,
    image_size,
    num_classes,
    num_verticals,
    seed,
    strict,
    quick,
    all_classes,
    as_json,
):
    """Print a dataset's shape, classes, verticals and split sizes."""
    from kc_keras.data import load_dataset

    dataset = load_dataset(
        name,
        path=path,
        taxonomy_file=taxonomy_file,
        quick=quick,
        seed=seed,
        strict=strict,
        num_classes=num_classes,
        num_verticals=num_verticals,
        image_size=image_size,
    )
    summary = summarize(dataset)
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        click.echo(format_summary(summary, all_classes=all_classes))
