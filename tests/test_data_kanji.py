"""Tests of the kanji-2136 source on a few kanji per radical."""

import logging

import numpy as np
import pytest

from kc_keras.data import kanji
from kc_keras.data.base import Taxonomy
from kc_keras.errors import KCError

# Two kanji per radical keep rendering to a few hundred kanji; radicals
# with 2 of them become verticals and the rest go to "other".
LIMIT = 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kanji-cache")


@pytest.fixture(scope="module")
def small_kanji(cache):
    return kanji.load(limit=LIMIT, min_radical_size=2, cache=cache)


def test_kanji_shapes_and_font_splits(small_kanji):
    taxonomy, preprocessing, splits = small_kanji
    num_classes = taxonomy.num_classes
    assert preprocessing.input_shape == (32, 32, 1)
    fonts_per_split = {"train": 5, "validation": 1, "test": 2}
    for name, split in splits.items():
        assert split.images.dtype == np.uint8
        assert split.images.shape[1:] == (32, 32, 1)
        counts = np.bincount(split.labels, minlength=num_classes)
        assert counts.max() <= fonts_per_split[name]
        # A few glyphs are missing from some fonts, never most of them.
        assert len(split) >= 0.95 * fonts_per_split[name] * num_classes
    assert set(splits["train"].labels.tolist()) == set(range(num_classes))


def test_kanji_taxonomy_groups_by_radical(small_kanji):
    taxonomy = small_kanji[0]
    radical_of = dict(kanji.read_joyo_kanji())
    assert taxonomy.is_contiguous
    assert taxonomy.vertical_names[-1] == kanji.OTHER_VERTICAL
    assert all(size == 2 for size in taxonomy.vertical_sizes[:-1])
    for name, vertical in zip(
        taxonomy.class_names, taxonomy.class_vertical, strict=True
    ):
        vertical_name = taxonomy.vertical_names[vertical]
        if vertical_name == kanji.OTHER_VERTICAL:
            continue
        assert vertical_name == kanji.radical_name(radical_of[name])
    water = taxonomy.vertical_names.index("085 ⽔")
    assert len(taxonomy.vertical_classes(water)) == 2


def test_kanji_glyphs_are_white_on_black(small_kanji):
    images = small_kanji[2]["train"].images.astype(np.float64)
    border = np.concatenate([images[:, 0], images[:, -1]], axis=1)
    assert border.mean() < 5
    assert images.max() == 255


def test_kanji_cache_is_reused(cache, small_kanji, monkeypatch):
    files = list(cache.glob("kanji-*.npz"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("rendered again despite the cache")

    monkeypatch.setattr(kanji, "render_all", fail)
    taxonomy, _, splits = kanji.load(
        limit=LIMIT, min_radical_size=2, cache=cache
    )
    assert taxonomy == small_kanji[0]
    np.testing.assert_array_equal(
        splits["test"].images, small_kanji[2]["test"].images
    )


def test_kanji_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KC_CACHE_DIR", str(tmp_path))
    assert kanji.cache_dir() == tmp_path


def test_kanji_drops_missing_and_blank_glyphs():
    seto = next(font for font in kanji.FONTS if font[0] == "seto")
    _, code_points = kanji.open_font(seto[1], seto[2])
    absent = next(
        chr(point)
        for point in range(0xE000, 0x110000)
        if point not in code_points
    )
    assert ord(" ") in code_points
    images, present = kanji.render_all(["水", absent, " "], fonts=[seto])
    assert present[:, 0].tolist() == [True, False, False]
    assert images[0].max() == 255
    assert images[1].max() == 0


def test_kanji_noto_picks_japanese_face():
    noto = kanji.FONTS[0]
    font, _ = kanji.open_font(noto[1], noto[2])
    assert font.getname()[0] == "Noto Sans CJK JP"


def test_kanji_merges_small_radicals_into_other():
    pairs = [("a", 5), ("b", 5), ("c", 9), ("d", 1), ("e", 5)]
    taxonomy, order = kanji.build_taxonomy(pairs, min_radical_size=3)
    assert taxonomy.class_names == ("a", "b", "e", "c", "d")
    assert taxonomy.vertical_names == ("005 ⼄", "other")
    assert taxonomy.class_vertical == (0, 0, 0, 1, 1)
    assert order.tolist() == [0, 1, 4, 2, 3]


def test_kanji_quick_keeps_largest_radicals():
    taxonomy = Taxonomy(
        ("a", "b", "c", "d", "e", "f", "g", "h", "i"),
        ("001 ⼀", "002 ⼁", "other"),
        (0, 0, 1, 1, 1, 2, 2, 2, 2),
    )
    smaller, classes = kanji.largest_verticals(taxonomy, 1)
    assert smaller.vertical_names == ("002 ⼁",)
    assert smaller.class_names == ("c", "d", "e")
    assert classes.tolist() == [2, 3, 4]


def test_kanji_missing_kanjidic_names_package(tmp_path):
    with pytest.raises(KCError, match="apt-get install kanjidic-xml"):
        kanji.read_joyo_kanji(tmp_path / "kanjidic2.xml.gz")


def test_kanji_joyo_list_has_2136_kanji():
    joyo = kanji.read_joyo_kanji()
    assert len(joyo) == 2136
    assert ("水", 85) in joyo


def test_kanji_missing_font_names_package():
    path = "/usr/share/fonts/truetype/seto/missing.ttf"
    with pytest.raises(KCError, match="apt-get install fonts-seto"):
        kanji.open_font(path, None)


def test_kanji_rerenders_corrupt_cache(tmp_path, caplog, monkeypatch):
    # One font per split keeps the two renderings short.
    fonts = tuple(
        next(font for font in kanji.FONTS if font[3] == split)
        for split in ("train", "validation", "test")
    )
    monkeypatch.setattr(kanji, "FONTS", fonts)
    first = kanji.load(limit=1, min_radical_size=2, cache=tmp_path)
    (cache_file,) = tmp_path.glob("kanji-*.npz")
    cache_file.write_bytes(b"not an npz file")
    with caplog.at_level(logging.WARNING, logger="kc_keras.data.kanji"):
        second = kanji.load(limit=1, min_radical_size=2, cache=tmp_path)
    assert second[0] == first[0]
    assert second[0].vertical_names == (kanji.OTHER_VERTICAL,)
    assert "ignoring unreadable cache" in caplog.text
    np.testing.assert_array_equal(
        second[2]["train"].images, first[2]["train"].images
    )
