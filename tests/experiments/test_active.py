"""The ``active`` experiment at a small size: records of both strategies per labelling round."""

from linadapt.experiments import active


def test_active_records_both_strategies_per_round(monkeypatch):
    monkeypatch.setattr(active, "POOL", 60)
    records = active.active(0, shots=5, quick=True)  # quick: 2 rounds
    by = {(r["method"], r["shots"]): r for r in records}
    assert set(by) == {(m, n) for m in ("query", "random") for n in (10, 15, 20)}
    assert all(r["experiment"] == "active" and r["seed"] == 0 for r in records)
    assert by["query", 10]["metrics"] == by["random", 10]["metrics"]  # the same start
    assert all(0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["metrics"]["nll"] > 0 for r in records)
    # its shots count labels over all classes, and its plot says so (other experiments: labels per class)
    from linadapt.app import report

    assert {r["shots_unit"] for r in records} == {"labels (all classes)"}
    assert report.shots_figure(records, "accuracy").axes[0].get_xlabel() == "labels (all classes)"
    plain = [{k: v for k, v in r.items() if k != "shots_unit"} for r in records]
    assert report.shots_figure(plain, "accuracy").axes[0].get_xlabel() == "labels per class"
