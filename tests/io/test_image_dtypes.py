"""32-bit integer (PIL mode "I") and 32-bit float (mode "F") images in class folders: the scaling of
linadapt.io.datasets (16-bit data in int32 by 65535, wider integers by the image's maximum, floats as stored),
checked against the arrays written."""

import numpy as np
import pytest

from linadapt.io.datasets import read_dataset

Image = pytest.importorskip("PIL.Image")


def _write(folder, name, arr, mode):
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr, mode=mode) if mode == "F" else Image.fromarray(arr.astype(np.int32), mode="I")
    img.save(folder / name)
    with Image.open(folder / name) as back:  # the file really holds a 32-bit image
        assert back.mode == mode


def test_int32_images_holding_16_bit_data_are_scaled_by_65535(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {c: [rng.integers(0, 65536, (3, 5)) for _ in range(2)] for c in ("cat", "dog")}
    arrays["cat"][0][0, 0] = 65535  # full range; a value above 255 and below 65535 elsewhere
    arrays["dog"][1][:] = 300  # a dark image stays dark: not stretched by its own maximum
    for c, items in arrays.items():
        for i, a in enumerate(items):
            _write(tmp_path / c, f"{i}.tif", a, "I")
    ds = read_dataset(str(tmp_path))
    assert ds.classes == ["cat", "dog"] and ds.y.tolist() == [0, 0, 1, 1]
    assert ds.X.shape == (4, 1, 3, 5) and ds.X.dtype == np.float32
    expected = np.stack([a for c in ("cat", "dog") for a in arrays[c]])[:, None] / 65535.0
    np.testing.assert_allclose(ds.X, expected, rtol=1e-6)
    np.testing.assert_allclose(ds.X[3], 300 / 65535.0, rtol=1e-6)


def test_int32_images_wider_than_16_bits_are_scaled_by_their_maximum(tmp_path):
    wide = np.array([[0, 70000, 1_000_000], [250_000, 500_000, 123]])
    narrow = np.array([[0, 1, 2], [3, 4, 65535]])
    _write(tmp_path / "a", "0.tif", wide, "I")
    _write(tmp_path / "a", "1.tif", narrow, "I")
    ds = read_dataset(str(tmp_path))
    np.testing.assert_allclose(ds.X[0, 0], wide / 1_000_000.0, rtol=1e-6)
    np.testing.assert_allclose(ds.X[1, 0], narrow / 65535.0, rtol=1e-6)
    assert ds.X.max() == pytest.approx(1.0)


def test_float32_images_are_read_as_stored(tmp_path):
    a = np.array([[0.25, -1.5, 3.0], [0.0, 1e-3, 0.999]], dtype=np.float32)
    b = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    _write(tmp_path / "x", "0.tiff", a, "F")
    _write(tmp_path / "y", "0.tiff", b, "F")
    ds = read_dataset(str(tmp_path))
    assert ds.y.tolist() == [0, 1] and ds.X.shape == (2, 1, 2, 3)
    np.testing.assert_array_equal(ds.X[0, 0], a)  # no rescaling, no clipping
    np.testing.assert_array_equal(ds.X[1, 0], b)


def test_unlabelled_folder_of_32_bit_images_for_prediction(tmp_path):
    a = np.full((2, 2), 32768)
    _write(tmp_path, "p.tif", a, "I")
    ds = read_dataset(str(tmp_path), require_target=False)
    assert ds.y is None
    np.testing.assert_allclose(ds.X[0, 0], 32768 / 65535.0, rtol=1e-6)
