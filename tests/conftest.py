"""Fixtures shared by the test files."""

import pytest


@pytest.fixture(scope="session")
def synthetic_dataset():
    """A 12-class synthetic dataset in 3 verticals of 16x16x1 images."""
    from kc_keras.data import load_dataset

    return load_dataset(
        "synthetic", num_classes=12, num_verticals=3, quick=True, seed=0
    )


@pytest.fixture
def write_png():
    """Return a function that writes a random RGB PNG and returns its path."""
    import numpy as np
    from PIL import Image

    def write(path, seed=0, size=(20, 24)):
        rng = np.random.default_rng(seed)
        pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        return path

    return write
