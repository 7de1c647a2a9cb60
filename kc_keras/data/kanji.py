"""kanji-2136: the Joyo kanji rendered from installed fonts.

The 2,136 Joyo kanji are the kanjidic2 entries of school grades 1-6 and 8
(Debian package kanjidic-xml). Each kanji is a class and its vertical is
its classical (Kangxi) radical. Radicals with fewer than
`MIN_RADICAL_SIZE` (12) Joyo kanji share one vertical named "other", which
leaves 48 radical verticals and "other".

Each class has one image per font: Noto Sans CJK JP and Noto Serif CJK JP
in Regular and Bold (fonts-noto-cjk), the three Kouzan brush styles
(fonts-kouzan-mouhitsu) and Seto (fonts-seto). The split is by font, so
test images come from styles absent from training:
    train: Noto Sans Regular and Bold, Noto Serif Regular, Kouzan
        (regular script) and Kouzan Sousyo (cursive script);
    validation: Noto Serif Bold;
    test: Kouzan Gyousyo (semi-cursive script) and Seto (handwriting).
A font without a glyph for a kanji (missing from its character map, or
drawn blank) gives no image for it, and the loader logs one warning with
the count.

Glyphs are drawn white on black, cropped to their ink, scaled to fit a
28x28 box and centred on a 32x32 canvas, so every font fills the same area.
32 pixels rather than 28 keeps the strokes of dense kanji apart. Rendered
arrays are cached in $KC_CACHE_DIR (default ~/.cache/kc-keras) as an .npz
file keyed by the settings and the source files' sizes and times.
"""

import gzip
import hashlib
import json
import logging
import os
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

import numpy as np

from kc_keras import io_utils
from kc_keras.data import splits as splits_lib
from kc_keras.data.base import Dataset
from kc_keras.data.base import Preprocessing
from kc_keras.data.base import Taxonomy
from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

KANJIDIC_PATH = Path("/usr/share/edict/kanjidic2.xml.gz")
JOYO_GRADES = frozenset({1, 2, 3, 4, 5, 6, 8})
MIN_RADICAL_SIZE = 12
OTHER_VERTICAL = "other"
IMAGE_SIZE = 32
GLYPH_BOX = 28
# Glyphs are drawn large and scaled down, which anti-aliases the strokes.
RENDER_SIZE = 96
CACHE_VERSION = 1
QUICK_VERTICALS = 4
# Global average pooling discards where each stroke lies, which is most of
# what separates one kanji from another. Measured on the full dataset: a
# generalist that averages its last feature map scored 0.45 % on the test
# fonts after 10 epochs, the flattening one 84 %.
BACKBONE = "small-cnn-flatten"
AUGMENT = {"shift": 0.06, "scale": 0.1, "rotation": 0.02, "stroke": 1}

NOTO = "/usr/share/fonts/opentype/noto"
KOUZAN = "/usr/share/fonts/truetype/kouzan-mouhitsu"
# (name, file, family to pick inside a .ttc collection or None, split)
FONTS = (
    ("noto-sans-regular", f"{NOTO}/NotoSansCJK-Regular.ttc", "JP", "train"),
    ("noto-sans-bold", f"{NOTO}/NotoSansCJK-Bold.ttc", "JP", "train"),
    ("noto-serif-regular", f"{NOTO}/NotoSerifCJK-Regular.ttc", "JP", "train"),
    ("kouzan", f"{KOUZAN}/kouzan-mouhitsu.ttf", None, "train"),
    ("kouzan-sousyo", f"{KOUZAN}/KouzanBrushFontSousyo.ttf", None, "train"),
    ("noto-serif-bold", f"{NOTO}/NotoSerifCJK-Bold.ttc", "JP", "validation"),
    ("kouzan-gyousyo", f"{KOUZAN}/kouzan-mouhitsu-gyosho.ttf", None, "test"),
    ("seto", "/usr/share/fonts/truetype/seto/setofont.ttf", None, "test"),
)
FONT_PACKAGES = {
    NOTO: "fonts-noto-cjk",
    KOUZAN: "fonts-kouzan-mouhitsu",
    "/usr/share/fonts/truetype/seto": "fonts-seto",
}


def cache_dir():
    """Return the cache folder: $KC_CACHE_DIR or ~/.cache/kc-keras."""
    return Path(
        os.environ.get("KC_CACHE_DIR") or Path.home() / ".cache" / "kc-keras"
    )


def read_joyo_kanji(path=None):
    """Return [(kanji, classical radical number)] of the Joyo kanji.

    Raises:
        KCError: kanjidic2 is missing or is not valid XML.
    """
    path = KANJIDIC_PATH if path is None else Path(path)
    if not path.is_file():
        raise KCError(
            f"kanjidic2 file {path} not found; install it with "
            "`sudo apt-get install kanjidic-xml`"
        )
    kanji = []
    try:
        with gzip.open(path, "rb") as stream:
            for _, element in ElementTree.iterparse(stream):
                if element.tag != "character":
                    continue
                grade = element.findtext("misc/grade")
                if grade and int(grade) in JOYO_GRADES:
                    radical = [
                        value.text
                        for value in element.findall("radical/rad_value")
                        if value.get("rad_type") == "classical"
                    ]
                    kanji.append((element.findtext("literal"), int(radical[0])))
                element.clear()
    except (OSError, ElementTree.ParseError) as error:
        raise KCError(
            f"kanjidic2 file {path} is unreadable ({error}); reinstall it "
            "with `sudo apt-get install --reinstall kanjidic-xml`"
        ) from error
    return kanji


def radical_name(number):
    """Return e.g. "085 ⽔": the radical number and its Kangxi character."""
    return f"{number:03d} {chr(0x2F00 + number - 1)}"


def build_taxonomy(kanji, min_radical_size=MIN_RADICAL_SIZE):
    """Group kanji by radical, merging small radicals into "other".

    Classes are sorted by vertical (radical number, "other" last) and keep
    the kanjidic order inside a vertical.

    Args:
        kanji: [(kanji, radical number)].
        min_radical_size: smallest radical kept as its own vertical.

    Returns:
        (taxonomy, order): the taxonomy and the index into `kanji` of each
        class.
    """
    radicals = np.array([radical for _, radical in kanji])
    numbers, counts = np.unique(radicals, return_counts=True)
    kept_radicals = [
        int(n)
        for n, c in zip(numbers, counts, strict=True)
        if c >= min_radical_size
    ]
    vertical_names = [radical_name(n) for n in kept_radicals]
    vertical_of_radical = {n: v for v, n in enumerate(kept_radicals)}
    other = len(kept_radicals)
    if any(int(r) not in vertical_of_radical for r in radicals):
        vertical_names.append(OTHER_VERTICAL)
    verticals = np.array(
        [vertical_of_radical.get(int(r), other) for r in radicals]
    )
    order = np.argsort(verticals, kind="stable")
    taxonomy = Taxonomy(
        class_names=tuple(kanji[i][0] for i in order),
        vertical_names=tuple(vertical_names),
        class_vertical=tuple(int(verticals[i]) for i in order),
    )
    return taxonomy, order


def font_package(path):
    for prefix, package in FONT_PACKAGES.items():
        if str(path).startswith(prefix):
            return package
    return "the package that provides it"


def open_font(path, family):
    """Return (Pillow font, set of code points) for one font face.

    Args:
        path: .ttf or .ttc file.
        family: substring of the family name to pick inside a .ttc
            collection (the first non-monospaced match), or None.

    Raises:
        KCError: the file is missing or has no matching face.
    """
    from fontTools.ttLib import TTFont
    from PIL import ImageFont

    if not Path(path).is_file():
        raise KCError(
            f"font {path} not found; install it with `sudo apt-get install "
            f"{font_package(path)}`"
        )
    index = 0
    if family is not None:
        for index in range(64):
            try:
                face = ImageFont.truetype(path, RENDER_SIZE, index=index)
            except OSError as error:
                raise KCError(
                    f"font collection {path} has no {family} face; "
                    f"reinstall {font_package(path)}"
                ) from error
            name = face.getname()[0]
            if family in name.split() and "Mono" not in name:
                break
    font = ImageFont.truetype(path, RENDER_SIZE, index=index)
    code_points = set(TTFont(path, fontNumber=index, lazy=True).getBestCmap())
    return font, code_points


def render_glyph(font, character):
    """Return a 32x32 uint8 image of `character`, or None when blank."""
    from PIL import Image
    from PIL import ImageDraw

    canvas_size = RENDER_SIZE * 2
    canvas = Image.new("L", (canvas_size, canvas_size))
    ImageDraw.Draw(canvas).text(
        (canvas_size // 2, canvas_size // 2),
        character,
        font=font,
        fill=255,
        anchor="mm",
    )
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    factor = GLYPH_BOX / max(glyph.size)
    width = max(1, round(glyph.size[0] * factor))
    height = max(1, round(glyph.size[1] * factor))
    glyph = glyph.resize((width, height), Image.Resampling.LANCZOS)
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE))
    image.paste(glyph, ((IMAGE_SIZE - width) // 2, (IMAGE_SIZE - height) // 2))
    return np.asarray(image, dtype=np.uint8)


def render_all(characters, fonts=None):
    """Render every character in every font of `fonts` (default `FONTS`).

    Returns:
        (images, present): uint8 (num_characters, num_fonts, 32, 32) and a
        bool (num_characters, num_fonts) mask of glyphs the font has.
    """
    fonts = FONTS if fonts is None else fonts
    images = np.zeros(
        (len(characters), len(fonts), IMAGE_SIZE, IMAGE_SIZE), np.uint8
    )
    present = np.zeros((len(characters), len(fonts)), bool)
    for f, (name, path, family, _) in enumerate(fonts):
        font, code_points = open_font(path, family)
        for c, character in enumerate(characters):
            if ord(character) not in code_points:
                continue
            glyph = render_glyph(font, character)
            if glyph is not None:
                images[c, f] = glyph
                present[c, f] = True
        logger.debug("rendered %d glyphs of font %s", present[:, f].sum(), name)
    return images, present


def cache_key(kanjidic_path, limit, min_radical_size):
    """Return a hash of the settings and the source files' sizes and times."""
    sources = []
    for path in [kanjidic_path] + [font[1] for font in FONTS]:
        stat = Path(path).stat() if Path(path).exists() else None
        sources.append(
            [
                str(path),
                stat.st_size if stat else None,
                stat.st_mtime_ns if stat else None,
            ]
        )
    settings = {
        "version": CACHE_VERSION,
        "image_size": IMAGE_SIZE,
        "glyph_box": GLYPH_BOX,
        "render_size": RENDER_SIZE,
        "fonts": [list(font) for font in FONTS],
        "limit": limit,
        "min_radical_size": min_radical_size,
        "sources": sources,
    }
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def load_rendered(
    kanjidic_path=None,
    limit=None,
    min_radical_size=MIN_RADICAL_SIZE,
    cache=None,
):
    """Return the taxonomy and glyph images, from the cache when possible.

    Args:
        kanjidic_path: kanjidic2 file, or None for the Debian package's.
        limit: keep only the first `limit` kanji of each radical (tests
            use it to render a handful of glyphs), or None for all.
        min_radical_size: smallest radical kept as its own vertical.
        cache: cache folder, or None for `cache_dir()`.

    Returns:
        (taxonomy, images, present) with images (num_classes, num_fonts,
        32, 32) in class order.
    """
    kanjidic_path = (
        KANJIDIC_PATH if kanjidic_path is None else Path(kanjidic_path)
    )
    cache = cache_dir() if cache is None else Path(cache)
    key = cache_key(kanjidic_path, limit, min_radical_size)
    cache_file = cache / f"kanji-{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file) as data:
                taxonomy = Taxonomy.from_dict(json.loads(str(data["taxonomy"])))
                return taxonomy, data["images"], data["present"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            logger.warning(
                "ignoring unreadable cache %s: %s", cache_file, error
            )
    kanji = read_joyo_kanji(kanjidic_path)
    if limit is not None:
        kanji = limit_per_radical(kanji, limit)
    taxonomy, order = build_taxonomy(kanji, min_radical_size)
    images, present = render_all(taxonomy.class_names)
    with io_utils.atomic_path(cache_file) as tmp:
        with open(tmp, "wb") as stream:
            np.savez_compressed(
                stream,
                taxonomy=np.array(
                    json.dumps(taxonomy.to_dict(), ensure_ascii=False)
                ),
                images=images,
                present=present,
            )
    logger.info("cached %d rendered kanji in %s", len(kanji), cache_file)
    return taxonomy, images, present


def largest_verticals(taxonomy, count):
    """Return the taxonomy restricted to its `count` largest radicals.

    Returns:
        (taxonomy, classes): the smaller taxonomy and the original index
        of each of its classes.
    """
    sizes = np.array(taxonomy.vertical_sizes)
    if OTHER_VERTICAL in taxonomy.vertical_names:
        # "other" mixes unrelated radicals, so it is never picked.
        sizes[taxonomy.vertical_names.index(OTHER_VERTICAL)] = -1
    # Stable sort on the negated sizes keeps ties in vertical order.
    kept_verticals = np.sort(np.argsort(-sizes, kind="stable")[:count])
    class_vertical = np.array(taxonomy.class_vertical)
    classes = np.flatnonzero(np.isin(class_vertical, kept_verticals))
    new_index = {int(v): i for i, v in enumerate(kept_verticals)}
    smaller = Taxonomy(
        class_names=tuple(taxonomy.class_names[c] for c in classes),
        vertical_names=tuple(
            taxonomy.vertical_names[v] for v in kept_verticals
        ),
        class_vertical=tuple(
            new_index[int(class_vertical[c])] for c in classes
        ),
    )
    return smaller, classes


def limit_per_radical(kanji, limit):
    """Keep the first `limit` kanji of each radical."""
    seen = {}
    kept = []
    for character, radical in kanji:
        if seen.get(radical, 0) < limit:
            kept.append((character, radical))
            seen[radical] = seen.get(radical, 0) + 1
    return kept


def load(
    quick=False,
    seed=0,
    kanjidic_path=None,
    limit=None,
    min_radical_size=MIN_RADICAL_SIZE,
    cache=None,
):
    """Build the font-based splits.

    Args:
        quick: keep only the kanji of the `QUICK_VERTICALS` largest
            radicals (400 classes), without "other", so a smoke run trains few
            specialists.
        seed: unused, because the split is fixed by font.
        kanjidic_path, limit, min_radical_size, cache: see `load_rendered`.

    Returns:
        (taxonomy, preprocessing, splits): the parts of a `Dataset`.
    """
    del seed
    taxonomy, images, present = load_rendered(
        kanjidic_path=kanjidic_path,
        limit=limit,
        min_radical_size=min_radical_size,
        cache=cache,
    )
    if quick:
        taxonomy, keep = largest_verticals(taxonomy, QUICK_VERTICALS)
        images, present = images[keep], present[keep]
    missing = int((~present).sum())
    if missing:
        per_font = {
            FONTS[f][0]: int((~present[:, f]).sum())
            for f in range(len(FONTS))
            if not present[:, f].all()
        }
        logger.warning(
            "dropped %d missing or blank glyphs of %d (per font: %s)",
            missing,
            present.size,
            per_font,
        )
    splits = {}
    for split in ("train", "validation", "test"):
        fonts = [f for f, font in enumerate(FONTS) if font[3] == split]
        mask = present[:, fonts]
        classes, font_positions = np.nonzero(mask)
        selected = images[:, fonts][classes, font_positions]
        splits[split] = splits_lib.make_split(selected, classes)
    empty = [
        taxonomy.class_names[c]
        for c in range(taxonomy.num_classes)
        if not (splits["train"].labels == c).any()
    ]
    if empty:
        raise KCError(
            f"no training font has a glyph for {''.join(empty)}; check the "
            "installed font packages"
        )
    return taxonomy, Preprocessing(IMAGE_SIZE, IMAGE_SIZE, 1), splits


def load_dataset(spec, quick, seed):
    """Return the kanji-2136 `Dataset` described by `spec`."""
    taxonomy, preprocessing, splits = load(quick=quick, seed=seed)
    return Dataset(
        name="kanji-2136",
        spec=spec,
        taxonomy=taxonomy,
        preprocessing=preprocessing,
        splits=splits,
        augment=dict(AUGMENT),
        seed=seed,
        backbone=BACKBONE,
    )
