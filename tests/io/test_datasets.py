import numpy as np
import pytest
from PIL import Image

from linadapt.io.datasets import DataError, read_dataset


def write(path, text):
    path.write_text(text)
    return str(path)


def test_csv_default_and_named_target(tmp_path):
    f = write(tmp_path / "d.csv", "a,b,label\n1,2,0\n3,4.5,1\n\n-1,0,1\n")
    ds = read_dataset(f)
    assert ds.X.dtype == np.float32 and ds.X.shape == (3, 2) and ds.columns == ["a", "b"]
    np.testing.assert_array_equal(ds.y, [0, 1, 1])
    ds = read_dataset(f, target="a")
    assert ds.columns == ["b", "label"] and ds.target == "a"
    np.testing.assert_array_equal(ds.y, [1, 3, -1])
    inputs_only = write(tmp_path / "p.csv", "a,b\n1,2\n")
    ds = read_dataset(inputs_only, target="label", require_target=False)
    assert ds.y is None and ds.X.shape == (1, 2)


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "is empty"),
        ("a,b\n", "no data rows"),
        ("a,b\n1,x\n", "line 2, column 'b': non-numeric value 'x'"),
        ("a,b\n1,nan\n", "NaN or inf"),
        ("a,b\n1,2,3\n", "3 values for 2 columns"),
        ("y\n1\n", "no input columns"),
    ],
)
def test_csv_errors(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        read_dataset(write(tmp_path / "d.csv", text))


def test_csv_missing_target_column(tmp_path):
    with pytest.raises(DataError, match="no column 'label'"):
        read_dataset(write(tmp_path / "d.csv", "a,b\n1,2\n"), target="label")


def test_csv_several_target_columns(tmp_path):
    path = write(tmp_path / "d.csv", "a,t1,b,t2,t3\n1,0,2,1,1\n3,1,4,0,1\n")
    for target in (["t1", "t2", "t3"], "t1,t2,t3", ["t1", "t2,t3"]):
        ds = read_dataset(path, target)
        assert ds.columns == ["a", "b"] and ds.target == ["t1", "t2", "t3"]
        np.testing.assert_array_equal(ds.y, [[0, 1, 1], [1, 0, 1]])
    assert read_dataset(path, ["t2"]).target == "t2"  # one name: y (n,) as with a string
    with pytest.raises(DataError, match="no column 'nope'"):
        read_dataset(path, "t1,nope")
    with pytest.raises(DataError, match="named more than once"):
        read_dataset(path, ["t1", "t1"])
    # prediction data: all the target columns, or none of them, may be present
    assert read_dataset(write(tmp_path / "x.csv", "a,b\n1,2\n"), "t1,t2", require_target=False).y is None
    with pytest.raises(DataError, match="no column 't2'"):
        read_dataset(write(tmp_path / "p.csv", "a,b,t1\n1,2,0\n"), "t1,t2", require_target=False)
    # a column whose name holds a comma is taken whole
    assert read_dataset(write(tmp_path / "c.csv", 'a,"t,1"\n1,2\n'), "t,1").target == "t,1"


def test_npz_named_input_arrays(tmp_path):
    ids, mask = np.arange(12).reshape(4, 3), np.ones((4, 3), np.int64)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask, scale=np.ones((4, 1)), y=np.arange(4))
    ds = read_dataset(str(tmp_path / "d.npz"), inputs=["input_ids", "attention_mask", "scale"])
    assert list(ds.X) == ["input_ids", "attention_mask", "scale"]
    assert ds.X["input_ids"].dtype.kind == "i" and ds.X["scale"].dtype == np.float32
    with pytest.raises(DataError, match="has no array 'mask'"):
        read_dataset(str(tmp_path / "d.npz"), inputs=["input_ids", "mask"])
    np.savez(tmp_path / "bad.npz", a=ids, b=mask[:3], y=np.arange(4))
    with pytest.raises(DataError, match=r"differ in their number of rows \(a 4, b 3\)"):
        read_dataset(str(tmp_path / "bad.npz"), inputs=["a", "b"])
    np.savez(tmp_path / "short.npz", a=ids, y=np.arange(3))
    with pytest.raises(DataError, match="a has 4 rows but y has 3"):
        read_dataset(str(tmp_path / "short.npz"), inputs=["a"])
    with pytest.raises(DataError, match=r"from an \.npz file only"):
        read_dataset(write(tmp_path / "d.csv", "a,y\n1,2\n"), inputs=["a"])


def test_npz_and_npy_folder(tmp_path):
    X = np.random.default_rng(0).normal(size=(5, 1, 4, 4))
    y = np.arange(5)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    ds = read_dataset(str(tmp_path / "d.npz"))
    assert ds.X.shape == (5, 1, 4, 4) and ds.X.dtype == np.float32
    folder = tmp_path / "arrays"
    folder.mkdir()
    np.save(folder / "X.npy", np.arange(6).reshape(3, 2))  # integer inputs (e.g. tokens) stay integer
    with pytest.raises(DataError, match=r"no y\.npy"):
        read_dataset(str(folder))
    assert read_dataset(str(folder), require_target=False).X.dtype.kind == "i"
    np.save(folder / "y.npy", np.zeros(4))
    with pytest.raises(DataError, match="X has 3 rows but y has 4"):
        read_dataset(str(folder))
    np.savez(tmp_path / "bad.npz", X=np.array([1.0, np.inf]), y=np.zeros(2))
    with pytest.raises(DataError, match="NaN or inf"):
        read_dataset(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "nox.npz", Z=np.zeros(2))
    with pytest.raises(DataError, match="no array 'X'"):
        read_dataset(str(tmp_path / "nox.npz"))
    np.savez(tmp_path / "obj.npz", X=np.array([[1], "a"], dtype=object), y=np.zeros(2))
    with pytest.raises(DataError, match="unpickling"):
        read_dataset(str(tmp_path / "obj.npz"))


def test_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    for name, count in (("cat", 2), ("dog", 3)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8), mode="L").save(tmp_path / name / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    ds = read_dataset(str(tmp_path))
    assert ds.X.shape == (5, 1, 6, 5) and ds.classes == ["cat", "dog"]
    np.testing.assert_array_equal(ds.y, [0, 0, 1, 1, 1])
    assert 0.0 <= ds.X.min() and ds.X.max() <= 1.0
    Image.fromarray(rng.integers(0, 256, (7, 5), dtype=np.uint8), mode="L").save(tmp_path / "dog" / "big.png")
    with pytest.raises(DataError, match="all images must have one size"):
        read_dataset(str(tmp_path))


def test_image_folder_labels_by_training_class_names_and_unlabelled_images(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("dog", "zebra"):
        (tmp_path / name).mkdir()
        Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8), mode="L").save(tmp_path / name / "0.png")
    ds = read_dataset(str(tmp_path), classes=["cat", "dog", "zebra"])  # no cat folder here
    np.testing.assert_array_equal(ds.y, [1, 2])
    assert ds.classes == ["cat", "dog", "zebra"]
    with pytest.raises(DataError, match="'dog', 'zebra' not among the training classes"):
        read_dataset(str(tmp_path), classes=["cat", "cow"])
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8), mode="L").save(
        tmp_path / ".ipynb_checkpoints" / "x.png"
    )
    assert read_dataset(str(tmp_path)).classes == ["dog", "zebra"]
    flat = tmp_path / "dog"  # images directly in the folder: unlabelled prediction data
    ds = read_dataset(str(flat), require_target=False)
    assert ds.y is None and ds.X.shape == (1, 1, 4, 4)
    with pytest.raises(DataError, match="no images found"):
        read_dataset(str(flat))  # training data need class folders
    (flat / ".ipynb_checkpoints").mkdir()  # a hidden sub-folder does not make a flat folder labelled
    ds = read_dataset(str(flat), require_target=False)
    assert ds.y is None and ds.X.shape[0] == 1
    Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8), mode="L").save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="holds both images"):
        read_dataset(str(tmp_path))


def test_sixteen_bit_images_keep_their_levels(tmp_path):
    (tmp_path / "a").mkdir()
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "a" / "ramp.png")
    ds = read_dataset(str(tmp_path))
    assert ds.X.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(ds.X[0, 0], ramp / 65535.0, atol=1e-6)
    assert len(np.unique(ds.X)) == 64


def test_other_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(str(tmp_path / "nothing.csv"))
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        read_dataset(str(tmp_path / "empty.npz"))
    (tmp_path / "d.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match="unknown data format"):
        read_dataset(str(tmp_path / "d.parquet"))
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError, match="no images found"):
        read_dataset(str(tmp_path / "imgs"))


def test_large_csv_parses_and_a_deep_bad_cell_is_named(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50_000, 6)).round(6)
    lines = ["a,b,c,d,e,label"] + [",".join(repr(float(v)) for v in row) for row in values]
    path = write(tmp_path / "big.csv", "\n".join(lines) + "\n")
    ds = read_dataset(path)
    assert ds.X.shape == (50_000, 5) and ds.columns == ["a", "b", "c", "d", "e"] and ds.target == "label"
    np.testing.assert_array_equal(ds.X, values[:, :5].astype(np.float32))
    np.testing.assert_array_equal(ds.y, values[:, 5])
    for bad, message in (("oops", "non-numeric value 'oops'"), ("inf", r"inf \(NaN or inf\)")):
        broken = list(lines)
        cells = broken[41_234].split(",")
        cells[3] = bad  # data row 41,234 is line 41,235 (the header is line 1), column 'd'
        broken[41_234] = ",".join(cells)
        with pytest.raises(DataError, match=rf"big2\.csv, line 41235, column 'd': {message}"):
            read_dataset(write(tmp_path / "big2.csv", "\n".join(broken) + "\n"))
    short = list(lines)
    short[49_999] = "1,2"
    with pytest.raises(DataError, match="line 50000: 2 values for 6 columns"):
        read_dataset(write(tmp_path / "big3.csv", "\n".join(short) + "\n"))


def test_csv_cells_numpy_does_not_read_are_read_as_python_does(tmp_path):
    # numpy's reader refuses these; the per-cell reader then takes what float() accepts, as before
    ds = read_dataset(write(tmp_path / "d.csv", 'a,b,y\n1_000,"2",0\n\u0663, 4 ,1\n'))
    np.testing.assert_array_equal(ds.X, [[1000, 2], [3, 4]])
    np.testing.assert_array_equal(ds.y, [0, 1])
    # checks keep their order whichever reader runs: a missing target before a bad cell
    with pytest.raises(DataError, match="no column 'label'"):
        read_dataset(write(tmp_path / "e.csv", "a,b\n1,x\n"), target="label")
