"""Ablation of the student: change one factor at a time, over several seeds.

Each variant differs from the default student (multi-teacher distillation,
`fc-sc` head, per-vertical self-paced scaling, `kl` soft loss) in one
factor, and `keras-distiller` is a reference row: the same student trained
by Keras's built-in `keras.distillation.Distiller` from the generalist
alone. The teachers of RUNS/<dataset> are trained once and shared by every
student.

The grid is a list of cells, one per (dataset, variant, seed). A cell trains
one student with `kc_keras.distill.train.train_student`, scores it on the
test split and writes its JSON atomically to RUNS/<dataset>/ablation/cells/
<settings hash>/<variant>-seed<seed>.json. A rerun skips every cell whose
JSON was written with the same settings, so a killed grid resumes where it
stopped. The seed of a cell sets the student's initial weights, the order
of the training images and their augmentation, but not the splits.

Per dataset, the report goes to RESULTS/ablation-<dataset>.json, .md and
.png: top-1 on the test split (mean and sample standard deviation over
seeds) of every variant, its difference to the default student, whether
that difference exceeds the seed spread, the teacher ensembles' top-1 and
the parameter counts.

Usage:
    .venv/bin/python benchmarks/ablate.py --datasets trio-30,kanji-2136
    .venv/bin/python benchmarks/ablate.py --datasets trio-30 --seeds 0 \\
        --variants default,no-distill --epochs 2
"""

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # Run as a script from a checkout: import the kc_keras next to it.
    sys.path.insert(0, str(REPO))

from kc_keras import io_utils  # noqa: E402
from kc_keras.errors import KCError  # noqa: E402

logger = logging.getLogger("benchmarks.ablate")

DEFAULT_DATASETS = ("trio-30", "kanji-2136")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_VARIANT = "default"
CELLS_FOLDER = "cells"
ABLATION_FOLDER = "ablation"
# The fc-fc head's width is chosen to match the fc-sc head's parameter
# count; a larger relative gap means the head comparison is not fair.
HEAD_MATCH_TOLERANCE = 0.05
CELL_FORMAT_VERSION = 1
# Below this generalist test top-1 the teachers carry too little knowledge
# for the comparisons to mean anything, so the report prints a warning.
WEAK_TEACHER_TOP1 = 0.10


@dataclasses.dataclass(frozen=True)
class Variant:
    """One student configuration of the grid.

    Attributes:
        name: short name used in file names and tables.
        change: what differs from the default student, in words.
        mode: `distill`, `no-distill` or `keras-distiller`
            (`kc_keras.distill.train.MODES`).
        head: `fc-sc` or `fc-fc`.
        self_paced: `vertical`, `class` or `none`.
        loss: `kl` or `sigmoid`.
        reference: a reference row rather than a one-factor change.
    """

    name: str
    change: str
    mode: str = "distill"
    head: str = "fc-sc"
    self_paced: str = "vertical"
    loss: str = "kl"
    reference: bool = False


VARIANTS = {
    variant.name: variant
    for variant in (
        Variant(DEFAULT_VARIANT, "none (fc-sc, self-paced vertical, kl)"),
        Variant("no-distill", "hard labels only", mode="no-distill"),
        Variant("fc-fc", "plain fc-fc head of matched size", head="fc-fc"),
        Variant("self-paced-class", "one gamma per class", self_paced="class"),
        Variant("self-paced-none", "no self-paced scaling", self_paced="none"),
        Variant("loss-sigmoid", "sigmoid soft loss", loss="sigmoid"),
        Variant(
            "keras-distiller",
            "keras.distillation.Distiller from the generalist",
            mode="keras-distiller",
            reference=True,
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class Direction:
    """A claim that one variant scores higher than another.

    Attributes:
        claim: the claim in words.
        better: the variant expected to score higher.
        worse: the variant expected to score lower.
    """

    claim: str
    better: str
    worse: str


DIRECTIONS = (
    Direction(
        "distillation from the specialists beats training on labels alone",
        DEFAULT_VARIANT,
        "no-distill",
    ),
    Direction(
        "the structurally connected head beats a plain FC head of matched size",
        DEFAULT_VARIANT,
        "fc-fc",
    ),
    Direction(
        "per-vertical self-paced scaling beats per-class scaling",
        DEFAULT_VARIANT,
        "self-paced-class",
    ),
    Direction(
        "per-class self-paced scaling beats no scaling",
        "self-paced-class",
        "self-paced-none",
    ),
)

SPREAD_RULE = (
    "a difference exceeds the seed spread when |mean(variant) - "
    "mean(default)| > std(default) + std(variant), with sample standard "
    "deviations (ddof=1) over seeds; Welch's t-test p-value is listed "
    "beside it"
)


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    """Training settings shared by every cell of the grid.

    Attributes:
        epochs: epochs per student; None keeps `TrainConfig`'s default.
        steps_per_epoch: limit on batches per epoch, or None for the
            whole training split.
        batch_size: batch size; None keeps `TrainConfig`'s default.
        learning_rate: peak learning rate; None keeps the default.
        quick: train on the quick data subset (`kc_keras.data.splits.
            quick_splits`, same taxonomy) for one epoch of a few steps.
        student: the default student's `StudentConfig` as a dict, or None
            for `StudentConfig()`; variants change its head and
            self-paced mode.
        cache_soft_targets: train the distilled students from teacher
            targets computed once per run (`kc distill
            --cache-soft-targets`) instead of running the teachers every
            step. Faster, but the targets belong to the unaugmented images.
    """

    epochs: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    quick: bool = False
    student: dict | None = None
    cache_soft_targets: bool = False

    def __post_init__(self):
        for name in ("epochs", "steps_per_epoch", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise KCError(f"{name} {value} is invalid; pass 1 or more")

    def to_dict(self):
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Grid


def parse_list(text, allowed=None, kind="value"):
    """Split an option separated by commas or spaces into a tuple of names.

    Raises:
        KCError: the list is empty or names a value not in `allowed`.
    """
    items = tuple(item for item in re.split(r"[,\s]+", text) if item)
    if not items:
        raise KCError(f"empty {kind} list {text!r}; pass comma-separated names")
    if allowed is not None:
        for item in items:
            if item not in allowed:
                raise KCError(
                    f"unknown {kind} {item!r}; expected some of "
                    f"{', '.join(allowed)}"
                )
    return items


def parse_seeds(text):
    """Parse `0,1,2` into a tuple of ints.

    Raises:
        KCError: an item is not an integer.
    """
    seeds = []
    for item in parse_list(text, kind="seed"):
        try:
            seeds.append(int(item))
        except ValueError as error:
            raise KCError(
                f"seed {item!r} is not an integer; pass e.g. --seeds 0,1,2"
            ) from error
    return tuple(seeds)


def plan_cells(datasets, variants, seeds):
    """Return the cells in run order: dataset, then seed, then variant.

    Seed-major order finishes one full comparison (every variant at one
    seed) before starting the next seed, so a grid stopped early still
    compares every variant.
    """
    return [
        (dataset, variant, seed)
        for dataset in datasets
        for seed in seeds
        for variant in variants
    ]


def cell_name(variant, seed):
    return f"{variant}-seed{seed}"


def cell_path(run_root, config, variant, seed):
    """Return RUN/ablation/cells/<settings hash>/<variant>-seed<seed>.json.

    Cells of other `AblationConfig` settings (epochs, ...) live in other
    folders, so trying other settings keeps the earlier results.
    """
    return (
        Path(run_root)
        / ABLATION_FOLDER
        / CELLS_FOLDER
        / settings_key(config.to_dict())
        / f"{cell_name(variant, seed)}.json"
    )


def settings_key(settings):
    """Return a short hash of a JSON-serialisable settings dict."""
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def teacher_fingerprint(run_root):
    """Return a hash of the teachers' manifest and model files.

    Model files enter by name, size and modification time, so retraining
    the teachers invalidates every finished cell without reading the
    models.

    Raises:
        KCError: the run has no teachers.
    """
    teachers = Path(run_root) / "teachers"
    manifest = teachers / "teachers.json"
    if not manifest.is_file():
        raise KCError(
            f"no teachers in {run_root} ({manifest} not found); run "
            f"`kc teachers --dataset {Path(run_root).name} --run {run_root}` "
            "first"
        )
    digest = hashlib.sha256(manifest.read_bytes())
    for path in sorted(teachers.glob("*.keras")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def read_finished_cell(path, settings, quiet=False):
    """Return a cell's stored result, or None unless it has `settings`.

    `quiet` skips the log line about a cell with other settings.
    """
    if not path.is_file():
        return None
    try:
        cell = io_utils.read_json(path)
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable cell %s: %s", path, error)
        return None
    if cell.get("settings") != settings:
        if quiet:
            return None
        logger.info("cell %s has other settings; training it again", path)
        return None
    return cell


# ---------------------------------------------------------------------------
# Training (imports TensorFlow)


@dataclasses.dataclass
class RunInputs:
    """One dataset's loaded run: data, teachers and their references.

    Attributes:
        run_root: the run folder.
        dataset: the `Dataset`, cut to the quick subset in quick mode.
        teachers: the loaded `Teachers`.
        fingerprint: `teacher_fingerprint` of the run.
        references: teacher top-1 and sizes (see `teacher_references`).
    """

    run_root: Path
    dataset: object
    teachers: object
    fingerprint: str
    references: dict


def load_inputs(run_root, quick):
    """Load a run's dataset and teachers once for all its cells.

    Raises:
        KCError: the run has no teachers, or they do not fit the data.
    """
    from kc_keras.data import splits as splits_lib
    from kc_keras.distill import train as train_lib
    from kc_keras.run import RunDir

    run_root = Path(run_root)
    fingerprint = teacher_fingerprint(run_root)
    dataset, teachers = train_lib.load_run_inputs(RunDir(run_root))
    if quick:
        # The quick subset keeps the run's taxonomy, so the teachers fit.
        dataset = dataclasses.replace(
            dataset, splits=splits_lib.quick_splits(dataset.splits, 0)
        )
    references = teacher_references(run_root, teachers)
    return RunInputs(run_root, dataset, teachers, fingerprint, references)


def teacher_references(run_root, teachers):
    """Return the teachers' test top-1 and parameter counts.

    Top-1 comes from RUN/teachers/metrics.json (the full test split) and,
    when the device benchmark has run, from RUN/bench/bench.json (TFLite
    exports, possibly on a subset of the test split).
    """
    run_root = Path(run_root)
    metrics_path = run_root / "teachers" / "metrics.json"
    metrics = io_utils.read_json(metrics_path) if metrics_path.is_file() else {}
    ensembles = metrics.get("ensembles", {})
    generalist_params = int(teachers.generalist.count_params())
    specialist_params = [int(m.count_params()) for m in teachers.specialists]
    references = {
        "teachers_metrics": str(metrics_path),
        "generalist_top1": metrics.get("models", {})
        .get("generalist", {})
        .get("top1"),
        "routed_top1": ensembles.get("routed", {}).get("top1"),
        "full_top1": ensembles.get("full", {}).get("top1"),
        "generalist_parameters": generalist_params,
        "specialist_parameters": specialist_params,
        # Both ensembles store the generalist and every specialist; the
        # routed one runs the generalist and one specialist per image.
        "ensemble_parameters": generalist_params + sum(specialist_params),
        "device_bench": device_bench_summary(run_root),
    }
    return references


def device_bench_summary(run_root):
    """Return name, kind, mode, bytes and top-1 of each bench.json system.

    Returns None when RUN/bench/bench.json does not exist.
    """
    path = Path(run_root) / "bench" / "bench.json"
    if not path.is_file():
        return None
    report = io_utils.read_json(path)
    systems = []
    for system in report.get("systems", []):
        accuracy = system.get("accuracy") or {}
        systems.append(
            {
                "name": system.get("name"),
                "kind": system.get("kind"),
                "mode": system.get("mode"),
                "model_bytes": system.get("model_bytes"),
                "top1": accuracy.get("top1"),
            }
        )
    return {"path": str(path), "systems": systems}


def student_configs(config, dataset):
    """Return `{variant name: StudentConfig}` with the fc-fc width fixed.

    The fc-fc head gets the hidden width whose parameter count is closest
    to the fc-sc head's (`matched_fc_hidden`), and a small-CNN backbone
    takes the dataset's variant (`backbones.for_dataset`).
    """
    from kc_keras.models import backbones
    from kc_keras.models import student as student_lib

    base = (
        student_lib.StudentConfig.from_dict(config.student)
        if config.student
        else student_lib.StudentConfig()
    )
    base = dataclasses.replace(
        base, backbone=backbones.for_dataset(base.backbone, dataset.backbone)
    )
    taxonomy = dataset.taxonomy
    hidden = base.fc_hidden or student_lib.matched_fc_hidden(base, taxonomy)
    return {
        name: dataclasses.replace(
            base,
            head=variant.head,
            self_paced=variant.self_paced,
            fc_hidden=hidden if variant.head == "fc-fc" else base.fc_hidden,
        )
        for name, variant in VARIANTS.items()
    }


def head_match(configs, dataset):
    """Build the fc-sc and fc-fc students and compare their head sizes.

    Returns:
        `{"fc-sc": counts, "fc-fc": counts, "fc_hidden", "relative_gap"}`
        with `count_parameters` dicts of the default and fc-fc students.

    Raises:
        KCError: the head sizes differ by more than `HEAD_MATCH_TOLERANCE`.
    """
    from kc_keras.models import student as student_lib

    counts = {}
    for name, head in ((DEFAULT_VARIANT, "fc-sc"), ("fc-fc", "fc-fc")):
        model = student_lib.build_student(
            configs[name], dataset.taxonomy, dataset.preprocessing
        )
        counts[head] = student_lib.count_parameters(model)
    sc_head = counts["fc-sc"]["head"]
    fc_head = counts["fc-fc"]["head"]
    gap = abs(fc_head - sc_head) / sc_head
    logger.info(
        "%s: head parameters fc-sc %d, fc-fc %d (hidden %d), gap %.1f%%; "
        "student totals %d and %d",
        dataset.name,
        sc_head,
        fc_head,
        configs["fc-fc"].fc_hidden,
        100 * gap,
        counts["fc-sc"]["total"],
        counts["fc-fc"]["total"],
    )
    if gap > HEAD_MATCH_TOLERANCE:
        raise KCError(
            f"the fc-fc head has {fc_head} parameters and the fc-sc head "
            f"{sc_head} ({100 * gap:.1f}% apart, more than "
            f"{100 * HEAD_MATCH_TOLERANCE:.0f}%); set fc_hidden in the "
            "student settings to match them"
        )
    return {
        "fc-sc": counts["fc-sc"],
        "fc-fc": counts["fc-fc"],
        "fc_hidden": configs["fc-fc"].fc_hidden,
        "relative_gap": gap,
    }


def cell_settings(inputs, variant, seed, config, student_config):
    """Return everything that decides a cell's result, as JSON."""
    return {
        "format_version": CELL_FORMAT_VERSION,
        "dataset": inputs.dataset.spec,
        "teachers": inputs.fingerprint,
        "variant": dataclasses.asdict(VARIANTS[variant]),
        "seed": seed,
        "ablation": config.to_dict(),
        "student": student_config.to_dict(),
    }


def train_config_for(config, seed):
    from kc_keras.distill.config import TrainConfig

    overrides = {
        key: value
        for key, value in (
            ("epochs", config.epochs),
            ("batch_size", config.batch_size),
            ("learning_rate", config.learning_rate),
        )
        if value is not None
    }
    return TrainConfig(
        seed=seed, steps_per_epoch=config.steps_per_epoch, **overrides
    )


def _link_teachers(work, run_root):
    # The soft-target cache fingerprints RUN/teachers/ of the run folder it
    # trains in, so the scratch folder links to the run's teachers.
    link = work.teachers
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("..") / "teachers", target_is_directory=True)


def run_cell(inputs, variant, seed, config, student_config, settings):
    """Train and score one student; return the cell's result dict.

    The student and its training backup go to RUN/ablation/student/ and
    RUN/ablation/logs/ under a name that includes a hash of the settings,
    so an interrupted cell resumes only with the same settings.
    """
    from kc_keras import evaluation
    from kc_keras import training
    from kc_keras.distill import train as train_lib
    from kc_keras.distill.config import LossConfig
    from kc_keras.distill.strategy import make_strategy
    from kc_keras.models import student as student_lib
    from kc_keras.run import RunDir

    spec = VARIANTS[variant]
    # `train_config_for` passes the seed, which also orders and augments
    # the training images.
    dataset = inputs.dataset
    name = f"{cell_name(variant, seed)}-{settings_key(settings)}"
    work = RunDir(inputs.run_root / ABLATION_FOLDER)
    options = train_lib.RunOptions(
        mode=spec.mode,
        output=name,
        quick=config.quick,
        cache_soft_targets=config.cache_soft_targets,
    )
    _link_teachers(work, inputs.run_root)
    start = time.perf_counter()
    student, history, step_time = train_lib.train_student(
        work,
        dataset,
        inputs.teachers,
        spec.mode,
        name,
        student_config,
        LossConfig(kind=spec.loss),
        train_config_for(config, seed),
        options,
        make_strategy("none"),
    )
    train_seconds = time.perf_counter() - start
    test = dataset.split("test")
    report = evaluation.accuracy_report(
        training.predict_logits(student, test.images),
        test.labels,
        dataset.taxonomy.class_vertical,
        dataset.taxonomy.vertical_names,
    )
    return {
        "settings": settings,
        "dataset": dataset.name,
        "variant": variant,
        "seed": seed,
        "top1": report["top1"],
        "top5": report["top5"],
        "test": report,
        "parameters": student_lib.count_parameters(student),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start,
        "step_time_s": step_time,
        # A cell killed after its last epoch's backup resumes with no
        # epoch left to run, so its history is empty.
        "final_history": {
            metric: float(values[-1])
            for metric, values in history.items()
            if values
        },
        "finished": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
    }


# ---------------------------------------------------------------------------
# Statistics


def sample_std(values):
    """Return the sample standard deviation (ddof=1), or None under 2."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1))


def welch_p_value(a, b):
    """Return the two-sided Welch's t-test p-value, or None when undefined.

    Undefined with fewer than 2 values per group or zero variance in both.
    """
    if len(a) < 2 or len(b) < 2:
        return None
    # Identical values give a variance of rounding noise, not exactly 0.
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return None
    from scipy import stats

    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def summarize(cells, variants):
    """Return one row per variant: seeds, mean, std and the comparison.

    Args:
        cells: cell result dicts of one dataset.
        variants: variant names in table order.

    Returns:
        A list of row dicts with `variant`, `change`, `seeds`, `top1`
        (per seed), `mean`, `std`, `diff` (mean minus the default's
        mean), `exceeds_spread` (True, False or None when either side has
        fewer than 2 seeds), `welch_p`, `parameters` and
        `mean_train_seconds`. Variants without cells get `mean` None, and
        the default's row has no comparison (`diff` None).
    """
    by_variant = {name: [] for name in variants}
    for cell in cells:
        if cell["variant"] in by_variant:
            by_variant[cell["variant"]].append(cell)
    default = sorted(
        by_variant.get(DEFAULT_VARIANT, []), key=lambda cell: cell["seed"]
    )
    default_top1 = [cell["top1"] for cell in default]
    rows = []
    for name in variants:
        found = sorted(by_variant[name], key=lambda cell: cell["seed"])
        top1 = [cell["top1"] for cell in found]
        rows.append(
            {
                "variant": name,
                "change": VARIANTS[name].change,
                "reference": VARIANTS[name].reference,
                "seeds": [cell["seed"] for cell in found],
                "top1": top1,
                "mean": float(np.mean(top1)) if top1 else None,
                "std": sample_std(top1),
                "parameters": found[0]["parameters"] if found else None,
                "mean_train_seconds": (
                    float(np.mean([c["train_seconds"] for c in found]))
                    if found
                    else None
                ),
                **(
                    compare(top1, default_top1)
                    if name != DEFAULT_VARIANT
                    else {"diff": None, "exceeds_spread": None, "welch_p": None}
                ),
            }
        )
    return rows


def compare(variant_top1, default_top1):
    """Return the difference of means and whether it exceeds the spread.

    See `SPREAD_RULE`.
    """
    if not variant_top1 or not default_top1:
        return {"diff": None, "exceeds_spread": None, "welch_p": None}
    diff = float(np.mean(variant_top1) - np.mean(default_top1))
    std_variant = sample_std(variant_top1)
    std_default = sample_std(default_top1)
    exceeds = None
    if std_variant is not None and std_default is not None:
        exceeds = bool(abs(diff) > std_variant + std_default)
    return {
        "diff": diff,
        "exceeds_spread": exceeds,
        "welch_p": welch_p_value(variant_top1, default_top1),
    }


def judge_directions(rows):
    """Return whether each claim of `DIRECTIONS` holds on these rows.

    Verdicts, with the spread of `SPREAD_RULE`:
        holds: the expected variant's mean is higher by more than the
            spread.
        reversed: the other variant's mean is higher by more than the
            spread.
        within spread, higher / within spread, not higher: the means
            differ by no more than the spread, with this sign.
        higher, one seed / lower, one seed / equal, one seed: a variant
            has one seed, so only the sign of the difference is known.
        not tested: a variant has no finished cells.
    """
    by_name = {row["variant"]: row for row in rows}
    verdicts = []
    for direction in DIRECTIONS:
        better = by_name.get(direction.better)
        worse = by_name.get(direction.worse)
        entry = {
            "claim": direction.claim,
            "better": direction.better,
            "worse": direction.worse,
            "diff": None,
            "verdict": "not tested",
        }
        if better and worse and better["top1"] and worse["top1"]:
            diff = better["mean"] - worse["mean"]
            stds = (better["std"], worse["std"])
            entry["diff"] = diff
            entry["welch_p"] = welch_p_value(better["top1"], worse["top1"])
            if None in stds:
                entry["verdict"] = _sign_verdict(diff)
            elif abs(diff) > sum(stds):
                entry["verdict"] = "holds" if diff > 0 else "reversed"
            else:
                entry["verdict"] = (
                    "within spread, higher"
                    if diff > 0
                    else "within spread, not higher"
                )
        verdicts.append(entry)
    return verdicts


def _sign_verdict(diff):
    if diff > 0:
        return "higher, one seed"
    if diff < 0:
        return "lower, one seed"
    return "equal, one seed"


# ---------------------------------------------------------------------------
# Reports


def build_report(dataset_name, cells, variants, context):
    """Return the ablation JSON of one dataset.

    Args:
        dataset_name: the dataset's name.
        cells: its cell result dicts.
        variants: variant names in table order.
        context: dict with `references`, `head_match`, `ablation`
            settings and `run`.
    """
    rows = summarize(cells, variants)
    references = context["references"]
    default = next(
        (row for row in rows if row["variant"] == DEFAULT_VARIANT), None
    )
    size = None
    if default and default["parameters"]:
        student_params = default["parameters"]["total"]
        size = {
            "student_parameters": student_params,
            "generalist_parameters": references["generalist_parameters"],
            "ensemble_parameters": references["ensemble_parameters"],
            "student_over_generalist": student_params
            / references["generalist_parameters"],
            "student_over_ensemble": student_params
            / references["ensemble_parameters"],
        }
    return {
        "dataset": dataset_name,
        "run": context["run"],
        "ablation": context["ablation"],
        "spread_rule": SPREAD_RULE,
        "rows": rows,
        "directions": judge_directions(rows),
        "head_match": context["head_match"],
        "references": references,
        "size": size,
        "cells": len(cells),
        "generated": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
    }


def _percent(value, signed=False):
    if value is None:
        return "n/a"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def render_markdown(report):
    """Return the Markdown page of one dataset's ablation report."""
    lines = [
        f"# Ablation on {report['dataset']}",
        "",
        f"Run folder `{report['run']}`; settings "
        f"`{json.dumps(report['ablation'], sort_keys=True)}`.",
        "Top-1 on the test split in percent, mean ± sample standard "
        "deviation over seeds. The difference is to the default student.",
        f"Rule: {SPREAD_RULE}.",
        "",
    ]
    generalist_top1 = report["references"]["generalist_top1"]
    if generalist_top1 is not None and generalist_top1 < WEAK_TEACHER_TOP1:
        lines += [
            f"**Warning:** the generalist scores {_percent(generalist_top1)}% "
            "top-1 on the test split, so the teachers have little to "
            "distil and these comparisons test nothing about the method.",
            "",
        ]
    lines += _variant_table(report["rows"])
    lines += _teacher_section(report["references"], report["size"])
    lines += _head_section(report["head_match"])
    lines += _direction_section(report["directions"])
    return "\n".join(lines) + "\n"


def _variant_table(rows):
    lines = [
        "| variant | change | seeds | top-1 | diff | exceeds spread "
        "| Welch p | parameters | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mean = _percent(row["mean"])
        if row["std"] is not None:
            mean += f" ± {_percent(row['std'])}"
        exceeds = {True: "yes", False: "no", None: "n/a"}[row["exceeds_spread"]]
        welch = "n/a" if row["welch_p"] is None else f"{row['welch_p']:.3f}"
        diff = _percent(row["diff"], signed=True)
        if row["variant"] == DEFAULT_VARIANT:
            exceeds = welch = diff = "-"
        params = row["parameters"]["total"] if row["parameters"] else "n/a"
        seconds = (
            "n/a"
            if row["mean_train_seconds"] is None
            else f"{row['mean_train_seconds']:.0f}"
        )
        lines.append(
            f"| {row['variant']} | {row['change']} | {len(row['seeds'])} | "
            f"{mean} | {diff} | {exceeds} | "
            f"{welch} | {params} | {seconds} |"
        )
    return lines


def _teacher_section(references, size):
    lines = [
        "",
        "## Teachers",
        "",
        "| model | top-1 | parameters |",
        "|---|---|---|",
        f"| generalist | {_percent(references['generalist_top1'])} | "
        f"{references['generalist_parameters']} |",
        f"| routed ensemble | {_percent(references['routed_top1'])} | "
        f"{references['ensemble_parameters']} |",
        f"| full ensemble | {_percent(references['full_top1'])} | "
        f"{references['ensemble_parameters']} |",
    ]
    if size:
        lines += [
            "",
            f"The default student has {size['student_parameters']} "
            f"parameters: {size['student_over_generalist']:.3f} x the "
            f"generalist and {size['student_over_ensemble']:.3f} x the "
            "ensemble (generalist and every specialist).",
        ]
    bench = references.get("device_bench")
    if bench and bench["systems"]:
        lines += [
            "",
            f"TFLite exports from `{bench['path']}`:",
            "",
            "| system | kind | mode | bytes | top-1 |",
            "|---|---|---|---|---|",
        ]
        for system in bench["systems"]:
            lines.append(
                f"| {system['name']} | {system['kind']} | {system['mode']} "
                f"| {system['model_bytes']} | {_percent(system['top1'])} |"
            )
    return lines


def _head_section(match):
    return [
        "",
        "## Head sizes",
        "",
        f"fc-sc head: {match['fc-sc']['head']} parameters "
        f"(student {match['fc-sc']['total']}); fc-fc head with hidden "
        f"width {match['fc_hidden']}: {match['fc-fc']['head']} parameters "
        f"(student {match['fc-fc']['total']}); gap "
        f"{100 * match['relative_gap']:.1f}%.",
    ]


def _direction_section(directions):
    lines = [
        "",
        "## Directions",
        "",
        "| claim | higher | lower | diff | Welch p | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for entry in directions:
        welch = entry.get("welch_p")
        welch = "n/a" if welch is None else f"{welch:.3f}"
        lines.append(
            f"| {entry['claim']} | {entry['better']} | {entry['worse']} | "
            f"{_percent(entry['diff'], signed=True)} | {welch} | "
            f"{entry['verdict']} |"
        )
    return lines


def plot_report(report, path):
    """Write a bar chart of mean top-1 with standard-deviation error bars.

    Dashed lines mark the generalist and the teacher ensembles.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [row for row in report["rows"] if row["mean"] is not None]
    names = [row["variant"] for row in rows]
    means = np.array([100 * row["mean"] for row in rows])
    errors = np.array([100 * (row["std"] or 0.0) for row in rows])
    colors = [
        "tab:gray"
        if row["reference"]
        else ("tab:blue" if row["variant"] == DEFAULT_VARIANT else "tab:cyan")
        for row in rows
    ]
    figure, axes = plt.subplots(figsize=(9.5, 4.5))
    axes.bar(names, means, yerr=errors, capsize=4, color=colors)
    references = report["references"]
    levels = []
    for label, key, style in (
        ("generalist", "generalist_top1", "tab:green"),
        ("routed ensemble", "routed_top1", "tab:orange"),
        ("full ensemble", "full_top1", "tab:red"),
    ):
        if references.get(key) is not None:
            level = 100 * references[key]
            levels.append(level)
            axes.axhline(level, linestyle="--", color=style, label=label)
    values = list(means - errors) + levels
    if values:
        top = max(list(means + errors) + levels)
        bottom = max(0.0, min(values) - 0.1 * (top - min(values) + 1.0))
        axes.set_ylim(bottom, min(100.0, top + 0.1 * (top - bottom + 1.0)))
    axes.set_ylabel("test top-1 (%)")
    seeds = max((len(row["seeds"]) for row in rows), default=0)
    axes.set_title(
        f"{report['dataset']}: student variants, mean ± std over seeds "
        f"(at most {seeds})"
    )
    axes.tick_params(axis="x", labelrotation=30)
    if levels:
        # Outside the axes, so the legend never hides a bar.
        axes.legend(
            loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small"
        )
    figure.tight_layout()
    with io_utils.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def write_reports(report, results_dir):
    """Write ablation-<dataset>.json, .md and .png; return their paths."""
    results_dir = Path(results_dir)
    stem = results_dir / f"ablation-{report['dataset']}"
    paths = {
        "json": stem.with_suffix(".json"),
        "md": stem.with_suffix(".md"),
        "png": stem.with_suffix(".png"),
    }
    io_utils.write_json(paths["json"], report)
    io_utils.write_text(paths["md"], render_markdown(report))
    plot_report(report, paths["png"])
    return paths


# ---------------------------------------------------------------------------
# The whole grid


@dataclasses.dataclass
class Progress:
    """Counts and timing of the cells trained in this process."""

    total: int
    done: int = 0
    trained: int = 0
    skipped: int = 0
    trained_seconds: float = 0.0
    stopped: bool = False

    def eta_seconds(self):
        """Return the remaining time estimated from trained cells."""
        if not self.trained:
            return None
        return self.trained_seconds / self.trained * (self.total - self.done)


def _format_duration(seconds):
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


def past_deadline(deadline):
    """Return True when the UTC time `deadline` (a datetime) has passed."""
    return (
        deadline is not None and datetime.datetime.now(datetime.UTC) >= deadline
    )


def run_grid(
    datasets,
    variants,
    seeds,
    config,
    runs_root,
    results_dir,
    deadline=None,
):
    """Run the missing cells of the grid and write every dataset's report.

    Args:
        datasets: dataset names; the run of dataset D is RUNS_ROOT/D.
        variants: variant names (keys of `VARIANTS`).
        seeds: student seeds.
        config: an `AblationConfig`.
        runs_root: folder of the run folders.
        results_dir: folder of the reports.
        deadline: an aware UTC datetime after which no new cell starts, or
            None.

    Returns:
        (reports: {dataset: report dict}, progress: `Progress`).

    Raises:
        KCError: a run without teachers, or mismatched head sizes.
    """
    # Every other variant is compared with the default, so it always runs.
    variants = tuple(dict.fromkeys((DEFAULT_VARIANT, *variants)))
    cells = plan_cells(datasets, variants, seeds)
    progress = Progress(total=len(cells))
    # Fail on a missing run before any training starts.
    for dataset_name in datasets:
        teacher_fingerprint(Path(runs_root) / dataset_name)
    reports = {}
    for dataset_name in datasets:
        run_root = Path(runs_root) / dataset_name
        inputs = load_inputs(run_root, config.quick)
        configs = student_configs(config, inputs.dataset)
        match = head_match(configs, inputs.dataset)
        for _, variant, seed in (c for c in cells if c[0] == dataset_name):
            _run_or_skip(
                inputs, variant, seed, config, configs, progress, deadline
            )
        context = {
            "references": inputs.references,
            "head_match": match,
            "ablation": config.to_dict(),
            "run": str(run_root),
        }
        # The report covers every variant finished with these settings,
        # including those of earlier invocations with other --variants.
        results = finished_cells(inputs, seeds, config, configs)
        report = build_report(dataset_name, results, tuple(VARIANTS), context)
        paths = write_reports(report, results_dir)
        logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
        reports[dataset_name] = report
    return reports, progress


def finished_cells(inputs, seeds, config, configs):
    """Return the stored cells of every variant and seed with `config`."""
    cells = []
    for variant in VARIANTS:
        for seed in seeds:
            settings = cell_settings(
                inputs, variant, seed, config, configs[variant]
            )
            cell = read_finished_cell(
                cell_path(inputs.run_root, config, variant, seed),
                settings,
                quiet=True,
            )
            if cell is not None:
                cells.append(cell)
    return cells


def _run_or_skip(inputs, variant, seed, config, configs, progress, deadline):
    """Return a cell's result: stored, newly trained, or None if stopped."""
    settings = cell_settings(inputs, variant, seed, config, configs[variant])
    path = cell_path(inputs.run_root, config, variant, seed)
    label = f"{inputs.dataset.name} {cell_name(variant, seed)}"
    cell = read_finished_cell(path, settings)
    if cell is not None:
        progress.done += 1
        progress.skipped += 1
        logger.info(
            "cell %d of %d (%s): finished before, top-1 %.4f",
            progress.done,
            progress.total,
            label,
            cell["top1"],
        )
        return cell

    if past_deadline(deadline):
        if not progress.stopped:
            logger.warning(
                "deadline %s passed; no new cells start", deadline.isoformat()
            )
        progress.stopped = True
        return None

    logger.info(
        "cell %d of %d (%s): training; ETA of the grid %s",
        progress.done + 1,
        progress.total,
        label,
        _format_duration(progress.eta_seconds()),
    )
    cell = run_cell(inputs, variant, seed, config, configs[variant], settings)
    io_utils.write_json(path, cell)

    progress.done += 1
    progress.trained += 1
    progress.trained_seconds += cell["wall_seconds"]
    logger.info(
        "cell %d of %d (%s): top-1 %.4f in %.0f s; ETA %s",
        progress.done,
        progress.total,
        label,
        cell["top1"],
        cell["wall_seconds"],
        _format_duration(progress.eta_seconds()),
    )
    return cell


def parse_deadline(text, now=None):
    """Parse `HH:MM` (UTC, today) into an aware datetime.

    Raises:
        KCError: the text is not HH:MM.
    """
    try:
        clock = datetime.datetime.strptime(text, "%H:%M").time()
    except ValueError as error:
        raise KCError(
            f"deadline {text!r} is invalid; pass a UTC time as HH:MM, "
            "e.g. 19:15"
        ) from error
    now = now or datetime.datetime.now(datetime.UTC)
    return datetime.datetime.combine(now.date(), clock, datetime.UTC)


# ---------------------------------------------------------------------------
# Command line


class InputError(click.ClickException):
    """A `KCError` shown as one line, exit code 2 (as in `kc`)."""

    exit_code = 2


@click.command()
@click.option(
    "--datasets",
    default=",".join(DEFAULT_DATASETS),
    show_default=True,
    help="Comma-separated dataset names; the run of D is RUNS_ROOT/D.",
)
@click.option(
    "--variants",
    default=",".join(VARIANTS),
    show_default=True,
    help="Comma-separated variants; the default student always runs.",
)
@click.option(
    "--seeds",
    default=",".join(map(str, DEFAULT_SEEDS)),
    show_default=True,
    help="Comma-separated student seeds.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    help="Epochs per student (default: kc distill's).",
)
@click.option(
    "--steps-per-epoch",
    type=click.IntRange(min=1),
    help="Batches per epoch at most (default: the whole training split).",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), help="Global batch size."
)
@click.option("--learning-rate", type=float, help="Peak Adam learning rate.")
@click.option(
    "--quick",
    is_flag=True,
    help="Smoke run: the quick data subset, one epoch of a few steps.",
)
@click.option(
    "--runs-root",
    type=click.Path(file_okay=False),
    default="runs",
    show_default=True,
    help="Folder holding one run folder per dataset.",
)
@click.option(
    "--results",
    "results_dir",
    type=click.Path(file_okay=False),
    default="benchmarks/results",
    show_default=True,
    help="Folder of ablation-<dataset>.json, .md and .png.",
)
@click.option(
    "--deadline",
    help="UTC time HH:MM after which no new cell starts; the reports are "
    "written from the cells finished by then.",
)
@click.option(
    "--cache-soft-targets",
    is_flag=True,
    help="Train distilled students from teacher targets computed once per "
    "run instead of running the teachers every step (faster; the targets "
    "belong to the unaugmented images).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(
    datasets,
    variants,
    seeds,
    epochs,
    steps_per_epoch,
    batch_size,
    learning_rate,
    quick,
    runs_root,
    results_dir,
    deadline,
    cache_soft_targets,
    verbose,
):
    """Train the ablation grid of students and write its reports.

    Prints each dataset's Markdown table to stdout; progress (cell i of n,
    ETA) goes to stderr.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        config = AblationConfig(
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            batch_size=batch_size,
            learning_rate=learning_rate,
            quick=quick,
            cache_soft_targets=cache_soft_targets,
        )
        reports, progress = run_grid(
            parse_list(datasets, kind="dataset"),
            parse_list(variants, tuple(VARIANTS), kind="variant"),
            parse_seeds(seeds),
            config,
            runs_root,
            results_dir,
            parse_deadline(deadline) if deadline else None,
        )
    except KCError as error:
        raise InputError(str(error)) from error
    for report in reports.values():
        click.echo(render_markdown(report))
    logger.info(
        "%d cells: %d trained, %d finished before, %d not run%s",
        progress.total,
        progress.trained,
        progress.skipped,
        progress.total - progress.done,
        " (deadline passed)" if progress.stopped else "",
    )


if __name__ == "__main__":
    main()
