"""Tests of the image-folder source on PNG folders built by the tests."""

import json
import logging

import numpy as np
import pytest

from kc_keras.data import load_dataset
from kc_keras.errors import KCError

CLASSES = ("cat", "dog", "fox", "owl")


@pytest.fixture
def image_root(tmp_path, write_png):
    """Four classes of 6 random PNG images each."""
    root = tmp_path / "images"
    for c, name in enumerate(CLASSES):
        for i in range(6):
            write_png(root / name / f"{i}.png", seed=10 * c + i)
    return root


def write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_folder_loads_rgb_images(image_root):
    dataset = load_dataset("image-folder", path=image_root, image_size=16)
    assert dataset.preprocessing.input_shape == (16, 16, 3)
    assert dataset.taxonomy.class_names == CLASSES
    assert dataset.spec["image_size"] == [16, 16]
    total = 0
    for name in ("train", "validation", "test"):
        split = dataset.split(name)
        assert split.images.shape[1:] == (16, 16, 3)
        assert split.images.dtype == np.uint8
        assert set(split.labels.tolist()) == {0, 1, 2, 3}
        total += len(split)
    assert total == 24


def test_folder_default_size_and_extensions(tmp_path, write_png):
    root = tmp_path / "images"
    for name in ("a", "b"):
        for i, suffix in enumerate((".png", ".PNG", ".bmp", ".gif")):
            path = write_png(root / name / f"{i}.png", seed=i)
            path.rename(path.with_suffix(suffix))
        write_text(root / name / "notes.txt", "not an image")
    dataset = load_dataset("image-folder", path=root)
    assert dataset.preprocessing.input_shape == (64, 64, 3)
    assert sum(len(split) for split in dataset.splits.values()) == 8


def test_folder_without_taxonomy_is_provisional(image_root):
    dataset = load_dataset("image-folder", path=image_root, image_size=8)
    assert dataset.taxonomy_provisional is True
    assert dataset.taxonomy.vertical_names == ("all",)


@pytest.mark.parametrize(
    "file_name, text",
    [
        ("tax.csv", "class,vertical\ncat,pets\ndog,pets\nfox,wild\nowl,wild\n"),
        ("tax.csv", "cat,pets\ndog,pets\n\nfox,wild\nowl,wild\n"),
        (
            "tax.json",
            json.dumps(
                {"cat": "pets", "dog": "pets", "fox": "wild", "owl": "wild"}
            ),
        ),
        (
            "tax.json",
            json.dumps(
                [
                    ["cat", "pets"],
                    ["dog", "pets"],
                    ["fox", "wild"],
                    ["owl", "wild"],
                ]
            ),
        ),
    ],
    ids=["csv-header", "csv-no-header", "json-object", "json-pairs"],
)
def test_folder_reads_taxonomy_file(image_root, tmp_path, file_name, text):
    taxonomy_file = write_text(tmp_path / file_name, text)
    dataset = load_dataset(
        "image-folder",
        path=image_root,
        taxonomy_file=taxonomy_file,
        image_size=8,
    )
    assert dataset.taxonomy_provisional is False
    assert dataset.taxonomy.vertical_names == ("pets", "wild")
    assert dataset.taxonomy.class_vertical == (0, 0, 1, 1)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "cat,pets\ndog,pets\nfox,wild\nowl,wild\nbat,wild\n",
            "classes without a folder: bat",
        ),
        ("cat,pets\ndog,pets\n", "leaves classes unassigned: fox, owl"),
        (
            "cat,pets\ndog,pets\nfox,pets\nowl,wild\n",
            "verticals with one class: wild",
        ),
        (
            "cat,pets\ncat,wild\ndog,pets\nfox,wild\nowl,wild\n",
            "assigns class 'cat' to both",
        ),
        ("cat,pets,extra\n", "line 1 has 3 fields"),
    ],
    ids=["unknown-class", "unassigned", "single-vertical", "twice", "fields"],
)
def test_folder_rejects_bad_taxonomy(image_root, tmp_path, text, message):
    taxonomy_file = write_text(tmp_path / "tax.csv", text)
    with pytest.raises(KCError, match=message):
        load_dataset(
            "image-folder", path=image_root, taxonomy_file=taxonomy_file
        )


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON"),
        ('"pets"', "invalid layout"),
        ('[["cat"]]', "invalid layout"),
    ],
    ids=["syntax", "string", "short-pair"],
)
def test_folder_rejects_bad_json_taxonomy(image_root, tmp_path, text, message):
    taxonomy_file = write_text(tmp_path / "tax.json", text)
    with pytest.raises(KCError, match=message):
        load_dataset(
            "image-folder", path=image_root, taxonomy_file=taxonomy_file
        )


def test_folder_rejects_missing_taxonomy_file(image_root, tmp_path):
    with pytest.raises(KCError, match="taxonomy file .*missing.csv not found"):
        load_dataset(
            "image-folder",
            path=image_root,
            taxonomy_file=tmp_path / "missing.csv",
        )


def test_folder_rejects_missing_path():
    with pytest.raises(KCError, match="needs a folder; pass --path"):
        load_dataset("image-folder")


def test_folder_rejects_missing_folder(tmp_path):
    with pytest.raises(KCError, match="image folder .*absent not found"):
        load_dataset("image-folder", path=tmp_path / "absent")


def test_folder_rejects_empty_folder(tmp_path):
    with pytest.raises(KCError, match="has 0 class subfolders"):
        load_dataset("image-folder", path=tmp_path)


def test_folder_rejects_single_class(tmp_path, write_png):
    for i in range(4):
        write_png(tmp_path / "only" / f"{i}.png", seed=i)
    with pytest.raises(KCError, match="has 1 class subfolders"):
        load_dataset("image-folder", path=tmp_path)


def test_folder_rejects_class_without_images(image_root):
    (image_root / "empty").mkdir()
    write_text(image_root / "empty" / "readme.txt", "no images")
    with pytest.raises(KCError, match="class folders without images .*empty"):
        load_dataset("image-folder", path=image_root)


def test_folder_skips_corrupt_images(image_root, caplog):
    write_text(image_root / "cat" / "broken.png", "not a png")
    write_text(image_root / "dog" / "broken.jpg", "not a jpeg")
    with caplog.at_level(logging.WARNING, logger="kc_keras.data.folder"):
        dataset = load_dataset("image-folder", path=image_root, image_size=8)
    assert sum(len(split) for split in dataset.splits.values()) == 24
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 unreadable images" in warnings[0].getMessage()


def test_folder_strict_names_corrupt_image(image_root):
    write_text(image_root / "cat" / "broken.png", "not a png")
    with pytest.raises(KCError, match=r"image .*cat/broken.png is unreadable"):
        load_dataset("image-folder", path=image_root, strict=True)


def test_folder_rejects_class_of_only_corrupt_images(image_root):
    (image_root / "bad").mkdir()
    write_text(image_root / "bad" / "x.png", "not a png")
    with pytest.raises(KCError, match="'bad' has no readable images"):
        load_dataset("image-folder", path=image_root)


def test_folder_rejects_class_too_small_to_split(image_root, write_png):
    for i in range(2):
        write_png(image_root / "rare" / f"{i}.png", seed=100 + i)
    with pytest.raises(KCError, match=r"too few images to split .*rare \(2\)"):
        load_dataset("image-folder", path=image_root)


def test_folder_quick_and_seed(image_root, write_png):
    for i in range(60):
        write_png(image_root / "cat" / f"extra{i}.png", seed=500 + i)
    quick = load_dataset(
        "image-folder", path=image_root, image_size=8, quick=True
    )
    assert quick.class_counts("train")[0] == 40
    first = load_dataset("image-folder", path=image_root, image_size=8, seed=1)
    again = load_dataset("image-folder", path=image_root, image_size=8, seed=1)
    other = load_dataset("image-folder", path=image_root, image_size=8, seed=2)
    test_images = first.split("test").images
    np.testing.assert_array_equal(test_images, again.split("test").images)
    assert not np.array_equal(test_images, other.split("test").images)
