"""Tests of the ablation grid (benchmarks/ablate.py).

The module builds one tiny synthetic run folder: 12 classes in 3
verticals, with teachers trained for a few steps. The grid then trains its
students in quick mode, one epoch of a few steps on the quick data subset.
"""

import datetime
import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent


def _load_ablate():
    spec = importlib.util.spec_from_file_location(
        "benchmarks_ablate", REPO / "benchmarks" / "ablate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablate = _load_ablate()

DATASET = "synthetic"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_student_dict():
    from kc_keras.models import backbones
    from kc_keras.models import student as student_lib

    return student_lib.StudentConfig(
        backbone=backbones.BackboneSpec(filters=4, blocks=1),
        fc_units=16,
        sc_width=8,
    ).to_dict()


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """A runs folder with RUNS/synthetic holding tiny trained teachers."""
    from kc_keras.data import load_dataset
    from kc_keras.models import backbones
    from kc_keras.models import teachers as teachers_lib
    from kc_keras.run import RunDir

    root = tmp_path_factory.mktemp("runs")
    dataset = load_dataset(
        DATASET, num_classes=12, num_verticals=3, quick=True, seed=0
    )
    config = teachers_lib.TeacherConfig(
        backbone=backbones.BackboneSpec(filters=4, blocks=1),
        epochs=1,
        specialist_epochs=1,
        batch_size=32,
        steps_per_epoch=2,
    )
    teachers_lib.train_teachers(dataset, RunDir(root / DATASET), config)
    return root


def quick_config():
    return ablate.AblationConfig(quick=True, student=tiny_student_dict())


@pytest.fixture(scope="module")
def grid(runs_root, tmp_path_factory):
    """The whole quick grid: every variant, one seed."""
    results = tmp_path_factory.mktemp("results")
    reports, progress = ablate.run_grid(
        [DATASET],
        tuple(ablate.VARIANTS),
        (0,),
        quick_config(),
        runs_root,
        results,
    )
    return reports[DATASET], progress, results


def test_grid_trains_every_variant(grid, runs_root):
    report, progress, _ = grid
    assert progress.total == len(ablate.VARIANTS)
    assert progress.trained == len(ablate.VARIANTS)
    assert progress.skipped == 0
    for variant in ablate.VARIANTS:
        path = ablate.cell_path(runs_root / DATASET, quick_config(), variant, 0)
        cell = json.loads(path.read_text())
        assert cell["variant"] == variant
        assert 0.0 <= cell["top1"] <= 1.0
        assert cell["test"]["num_images"] > 0
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == set(ablate.VARIANTS)
    assert all(row["seeds"] == [0] for row in rows.values())


def test_grid_variants_differ_in_one_factor(grid, runs_root):
    cells = {
        variant: json.loads(
            ablate.cell_path(
                runs_root / DATASET, quick_config(), variant, 0
            ).read_text()
        )
        for variant in ablate.VARIANTS
    }
    student = {
        name: cell["settings"]["student"] for name, cell in cells.items()
    }
    default = student[ablate.DEFAULT_VARIANT]
    assert student["fc-fc"]["head"] == "fc-fc"
    assert student["fc-fc"]["fc_hidden"] is not None
    assert student["self-paced-class"]["self_paced"] == "class"
    assert student["self-paced-none"]["self_paced"] == "none"
    for name in ("no-distill", "loss-sigmoid", "keras-distiller"):
        assert student[name] == default, name
    assert cells["loss-sigmoid"]["settings"]["variant"]["loss"] == "sigmoid"
    assert (
        cells["keras-distiller"]["settings"]["variant"]["mode"]
        == "keras-distiller"
    )


def test_grid_matches_head_sizes(grid):
    report, _, _ = grid
    match = report["head_match"]
    assert match["relative_gap"] <= ablate.HEAD_MATCH_TOLERANCE
    assert match["fc-sc"]["head"] > 0
    assert match["fc-fc"]["head"] > 0


def test_grid_writes_reports(grid):
    report, _, results = grid
    stem = results / f"ablation-{DATASET}"
    stored = json.loads(stem.with_suffix(".json").read_text())
    assert stored["rows"] == json.loads(json.dumps(report["rows"]))
    markdown = stem.with_suffix(".md").read_text()
    assert "| keras-distiller |" in markdown
    assert "routed ensemble" in markdown
    assert stem.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE
    references = report["references"]
    assert 0.0 <= references["routed_top1"] <= 1.0
    assert references["ensemble_parameters"] > 0
    assert report["size"]["student_over_ensemble"] > 0


def test_markdown_warns_of_weak_teachers(grid):
    report, _, _ = grid
    weak = {
        **report,
        "references": {**report["references"], "generalist_top1": 0.01},
    }
    strong = {
        **report,
        "references": {**report["references"], "generalist_top1": 0.9},
    }
    assert "**Warning:**" in ablate.render_markdown(weak)
    assert "**Warning:**" not in ablate.render_markdown(strong)


def test_rerun_skips_finished_cells(grid, runs_root, tmp_path):
    path = ablate.cell_path(
        runs_root / DATASET, quick_config(), ablate.DEFAULT_VARIANT, 0
    )
    before = path.stat().st_mtime_ns
    _, progress = ablate.run_grid(
        [DATASET],
        (ablate.DEFAULT_VARIANT, "no-distill"),
        (0,),
        quick_config(),
        runs_root,
        tmp_path,
    )
    assert progress.trained == 0
    assert progress.skipped == 2
    assert path.stat().st_mtime_ns == before


def test_rerun_retrains_cell_with_other_settings(grid, runs_root, tmp_path):
    path = ablate.cell_path(
        runs_root / DATASET, quick_config(), ablate.DEFAULT_VARIANT, 0
    )
    cell = json.loads(path.read_text())
    cell["settings"]["ablation"]["epochs"] = 99
    path.write_text(json.dumps(cell))
    reports, progress = ablate.run_grid(
        [DATASET],
        (ablate.DEFAULT_VARIANT,),
        (0,),
        quick_config(),
        runs_root,
        tmp_path,
    )
    assert progress.trained == 1
    restored = json.loads(path.read_text())
    assert restored["settings"]["ablation"]["epochs"] is None
    # The report still lists the variants of the first invocation.
    rows = {row["variant"]: row for row in reports[DATASET]["rows"]}
    assert rows["fc-fc"]["seeds"] == [0]


def test_deadline_stops_new_cells(grid, runs_root, tmp_path):
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    reports, progress = ablate.run_grid(
        [DATASET],
        (ablate.DEFAULT_VARIANT,),
        (5,),
        quick_config(),
        runs_root,
        tmp_path,
        deadline=past,
    )
    assert progress.stopped
    assert progress.trained == 0
    assert not ablate.cell_path(
        runs_root / DATASET, quick_config(), ablate.DEFAULT_VARIANT, 5
    ).exists()
    assert (tmp_path / f"ablation-{DATASET}.md").is_file()


def test_grid_cached_soft_targets(grid, runs_root, tmp_path):
    config = ablate.AblationConfig(
        quick=True, student=tiny_student_dict(), cache_soft_targets=True
    )
    _, progress = ablate.run_grid(
        [DATASET],
        (ablate.DEFAULT_VARIANT,),
        (0,),
        config,
        runs_root,
        tmp_path,
    )
    assert progress.trained == 1
    cache = runs_root / DATASET / ablate.ABLATION_FOLDER / "soft_targets"
    assert (cache / "index.json").is_file()
    path = ablate.cell_path(
        runs_root / DATASET, config, ablate.DEFAULT_VARIANT, 0
    )
    cell = json.loads(path.read_text())
    assert cell["settings"]["ablation"]["cache_soft_targets"] is True
    # The uncached cell of the same variant and seed is kept.
    assert ablate.cell_path(
        runs_root / DATASET, quick_config(), ablate.DEFAULT_VARIANT, 0
    ).is_file()


def make_cell(variant, seed, top1):
    return {
        "variant": variant,
        "seed": seed,
        "top1": top1,
        "parameters": {"total": 100, "head": 10},
        "train_seconds": 1.0,
    }


def cells_of(values):
    return [
        make_cell(variant, seed, top1)
        for variant, top1s in values.items()
        for seed, top1 in enumerate(top1s)
    ]


@pytest.mark.parametrize(
    ("default", "variant", "exceeds"),
    [
        ([0.90, 0.91, 0.92], [0.80, 0.81, 0.82], True),
        ([0.90, 0.91, 0.92], [0.905, 0.915, 0.925], False),
        ([0.90, 0.90, 0.90], [0.95, 0.95, 0.95], True),
    ],
    ids=["far-below", "inside-spread", "no-spread-above"],
)
def test_summarize_spread_rule(default, variant, exceeds):
    rows = ablate.summarize(
        cells_of({"default": default, "no-distill": variant}),
        ("default", "no-distill"),
    )
    row = rows[1]
    assert row["mean"] == pytest.approx(sum(variant) / 3)
    assert row["diff"] == pytest.approx((sum(variant) - sum(default)) / 3)
    assert row["exceeds_spread"] is exceeds


def test_summarize_sample_std():
    rows = ablate.summarize(
        cells_of({"default": [0.1, 0.2, 0.3]}), ("default",)
    )
    assert rows[0]["std"] == pytest.approx(0.1)
    # The default is not compared with itself.
    assert rows[0]["diff"] is None
    assert rows[0]["welch_p"] is None


def test_summarize_one_seed_has_no_spread():
    rows = ablate.summarize(
        cells_of({"default": [0.9], "fc-fc": [0.8]}), ("default", "fc-fc")
    )
    assert rows[1]["std"] is None
    assert rows[1]["exceeds_spread"] is None
    assert rows[1]["diff"] == pytest.approx(-0.1)


def test_summarize_missing_variant():
    rows = ablate.summarize(
        cells_of({"default": [0.9, 0.8]}), ("default", "fc-fc")
    )
    assert rows[1]["mean"] is None
    assert rows[1]["diff"] is None


def test_welch_p_value_separates_groups():
    far = ablate.welch_p_value([0.9, 0.91, 0.92], [0.5, 0.51, 0.52])
    near = ablate.welch_p_value([0.9, 0.91, 0.92], [0.9, 0.92, 0.91])
    assert far < 0.01
    assert near > 0.5
    assert ablate.welch_p_value([0.9], [0.8, 0.7]) is None


@pytest.mark.parametrize(
    ("default", "worse", "verdict"),
    [
        ([0.90, 0.91, 0.92], [0.80, 0.81, 0.82], "holds"),
        ([0.90, 0.91, 0.92], [0.895, 0.905, 0.915], "within spread, higher"),
        (
            [0.895, 0.905, 0.915],
            [0.90, 0.91, 0.92],
            "within spread, not higher",
        ),
        ([0.80, 0.81, 0.82], [0.90, 0.91, 0.92], "reversed"),
        ([0.90], [0.80], "higher, one seed"),
        ([0.80], [0.90], "lower, one seed"),
        ([0.80], [0.80], "equal, one seed"),
    ],
    ids=[
        "holds",
        "within-spread-higher",
        "within-spread-lower",
        "reversed",
        "one-seed-up",
        "one-seed-down",
        "one-seed-equal",
    ],
)
def test_judge_directions_verdicts(default, worse, verdict):
    rows = ablate.summarize(
        cells_of({"default": default, "no-distill": worse}),
        tuple(ablate.VARIANTS),
    )
    verdicts = {v["worse"]: v for v in ablate.judge_directions(rows)}
    assert verdicts["no-distill"]["verdict"] == verdict
    assert verdicts["fc-fc"]["verdict"] == "not tested"


def test_plan_cells_is_seed_major():
    cells = ablate.plan_cells(["a"], ["default", "fc-fc"], [0, 1])
    assert cells == [
        ("a", "default", 0),
        ("a", "fc-fc", 0),
        ("a", "default", 1),
        ("a", "fc-fc", 1),
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--variants", "default,wide"], "unknown variant 'wide'"),
        (["--seeds", "0,x"], "seed 'x' is not an integer"),
        (["--deadline", "7pm"], "deadline '7pm' is invalid"),
        (["--datasets", "missing-run"], "kc teachers --dataset"),
    ],
    ids=["unknown-variant", "bad-seed", "bad-deadline", "no-teachers"],
)
def test_cli_rejects_bad_input(arguments, message, tmp_path):
    result = CliRunner().invoke(
        ablate.main,
        ["--runs-root", str(tmp_path), "--results", str(tmp_path), *arguments],
    )
    assert result.exit_code == 2
    assert message in result.output


def test_parse_deadline_is_utc_today():
    now = datetime.datetime(2026, 1, 2, 10, 0, tzinfo=datetime.UTC)
    deadline = ablate.parse_deadline("19:15", now)
    assert deadline == datetime.datetime(
        2026, 1, 2, 19, 15, tzinfo=datetime.UTC
    )
