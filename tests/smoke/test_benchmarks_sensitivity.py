"""The sensitivity benchmark runs end to end at a tiny size and saves well-formed JSON."""

import json

import pytest

from benchmarks import sensitivity

RECORD_KEYS = {"task", "seed", "budget", "method", "metric", "value", "dense",
               "criterion", "measured_sparsity", "per_leaf"}


def test_json_is_well_formed(tmp_path):
  out, png = tmp_path / "sensitivity.json", tmp_path / "sensitivity.png"
  result = sensitivity.main([
      "--tasks", "digits", "--seeds", "1", "--epochs", "1", "--budgets", "0.9",
      "--sparsities", "0.5,0.9,0.95", "--methods", "uniform,allocated",
      "--out", str(out), "--plot", str(png),
  ])
  saved = json.loads(out.read_text())
  assert saved["records"] == json.loads(json.dumps(result["records"]))
  assert "--epochs 1" in saved["command"] and saved["machine"]["cpu_count"] > 0
  assert png.stat().st_size > 0

  (analysis,) = saved["analyses"]
  # The four kernels of the digits CNN, each swept at every sparsity.
  assert len(analysis["losses"]) == 4
  assert all(len(v) == 3 for v in analysis["losses"].values())
  records = saved["records"]
  assert [(r["budget"], r["method"]) for r in records] == [
      (0.9, "uniform"), (0.9, "allocated")]
  for r in records:
    assert RECORD_KEYS <= r.keys()
    assert 0.0 <= r["value"] <= 1.0
    # Every method prunes the budget of the analysed kernels, to rounding.
    assert r["measured_sparsity"] == pytest.approx(r["budget"], abs=1e-4)
    assert set(r["per_leaf"]) == set(analysis["sizes"])
    if r["method"] == "uniform":
      assert all(s == pytest.approx(r["budget"], abs=1e-2) for s in r["per_leaf"].values())
    if r["method"] == "allocated":
      # The masks hold the allocation chosen for this budget.
      chosen = analysis["allocations"][f"{r['budget']:g}"]
      for path, s in r["per_leaf"].items():
        assert s == pytest.approx(chosen[path], abs=1 / analysis["sizes"][path])


def test_rejects_a_budget_past_the_sweep():
  with pytest.raises(SystemExit):
    sensitivity.main(["--budgets", "0.9", "--sparsities", "0.5,0.8"])
  with pytest.raises(SystemExit):
    sensitivity.main(["--tasks", "cifar"])
  with pytest.raises(SystemExit):
    sensitivity.main(["--methods", "allocated"])  # No uniform reference.
