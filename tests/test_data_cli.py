"""Tests of `kc data describe`."""

import json

import pytest
from click.testing import CliRunner

from kc_keras.cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, ["data", "describe", *args])


def test_describe_prints_counts_and_imbalance():
    result = run(
        "--dataset", "synthetic", "--num-classes", "6", "--num-verticals", "2"
    )
    assert result.exit_code == 0, result.output
    output = result.stdout
    assert "dataset: synthetic" in output
    assert "image shape: 16x16x1" in output
    assert "classes: 6" in output
    assert "verticals: 2" in output
    assert "images: train 240, validation 60, test 60" in output
    assert "vertical_0: 3 classes, 120/30/30" in output
    assert "class_5 (vertical_1): 40/10/10" in output
    assert "per class: min 40 (class_0), max 40 (class_0), ratio 1.0" in output


def test_describe_json_lists_every_class():
    result = run("--dataset", "synthetic", "--num-classes", "150", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["num_classes"] == 150
    assert len(summary["classes"]) == 150
    assert summary["spec"]["num_classes"] == 150


def test_describe_shortens_long_class_lists():
    result = run("--dataset", "synthetic", "--num-classes", "150")
    assert result.exit_code == 0, result.output
    assert "the 5 smallest and largest" in result.stdout
    assert "class_149" in result.stdout
    class_lines = [
        line
        for line in result.stdout.splitlines()
        if line.startswith("  class_")
    ]
    assert len(class_lines) == 10


def test_describe_image_folder_with_taxonomy(tmp_path, write_png):
    root = tmp_path / "images"
    for c, name in enumerate(("a", "b", "c", "d")):
        for i in range(3 + c):
            write_png(root / name / f"{i}.png", seed=10 * c + i)
    taxonomy = tmp_path / "tax.csv"
    taxonomy.write_text("a,x\nb,x\nc,y\nd,y\n", encoding="utf-8")
    result = run(
        "--dataset",
        "image-folder",
        "--path",
        str(root),
        "--taxonomy",
        str(taxonomy),
        "--image-size",
        "8",
    )
    assert result.exit_code == 0, result.output
    assert "image shape: 8x8x3" in result.stdout
    assert "x: 2 classes" in result.stdout
    assert "provisional" not in result.stdout


def test_describe_marks_provisional_taxonomy(tmp_path, write_png):
    for name in ("a", "b"):
        for i in range(3):
            write_png(tmp_path / name / f"{i}.png", seed=i)
    result = run("--dataset", "image-folder", "--path", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "verticals: 1 (provisional" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--dataset", "cifar"],
            "unknown dataset 'cifar'; expected one of trio-30, kanji-2136, "
            "image-folder, synthetic",
        ),
        (["--dataset", "image-folder"], "needs a folder; pass --path"),
        (["--dataset", "trio-30", "--num-classes", "3"], "does not apply"),
    ],
    ids=["unknown-name", "no-path", "unused-option"],
)
def test_describe_reports_bad_input(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["teachers", "--dataset", "mnist", "--run", "run"],
            "'mnist' is not one of",
        ),
        (["distill", "--bogus"], "No such option '--bogus'"),
        (["nope"], "No such command 'nope'"),
    ],
    ids=["bad-choice", "bad-option", "bad-command"],
)
def test_usage_errors_are_one_line(args, expected):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "--help` for the options" in lines[0]
