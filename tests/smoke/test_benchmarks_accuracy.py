"""The accuracy benchmark runs end to end at a tiny size and saves well-formed JSON."""

import functools
import json
import math

import numpy as np
import pytest

from benchmarks import accuracy

RECORD_KEYS = {
    "task", "schedule", "sparsity", "metric", "seeds", "values", "mean", "std",
    "measured_sparsity", "measured_sparsity_per_seed", "wall_s",
    "wall_s_per_seed", "compile_s", "epochs", "steps_per_epoch", "end_step",
    "batch_size", "learning_rate", "params", "trajectory",
}
HEADER_KEYS = {"command", "platform", "cpu_count", "jax", "total_wall_s"}


def test_json_is_well_formed(tmp_path):
  out = tmp_path / "accuracy.json"
  result = accuracy.main([
      "--tasks", "mnist1d", "--sparsities", "0,0.5", "--schedules",
      "log,one-shot", "--seeds", "2", "--epochs", "2", "--out", str(out),
  ])
  saved = json.loads(out.read_text())
  assert saved == json.loads(json.dumps(result))  # What main returned.
  assert HEADER_KEYS <= saved["header"].keys()
  assert "--epochs 2" in saved["header"]["command"]

  records = saved["records"]
  # One record per configuration: the dense run once, then each schedule.
  assert [(r["task"], r["schedule"], r["sparsity"]) for r in records] == [
      ("mnist1d", "dense", 0.0), ("mnist1d", "log", 0.5),
      ("mnist1d", "one-shot", 0.5),
  ]
  for r in records:
    assert RECORD_KEYS <= r.keys()
    assert r["metric"] == "test_accuracy"
    assert len(r["values"]) == len(r["measured_sparsity_per_seed"]) == 2
    assert all(0.0 <= v <= 1.0 for v in r["values"])
    assert r["mean"] == pytest.approx(np.mean(r["values"]))
    assert r["std"] == pytest.approx(np.std(r["values"], ddof=1))
    for s in r["measured_sparsity_per_seed"] + r["trajectory"]["measured_sparsity"]:
      assert 0.0 <= s <= 1.0
    # Exact counts: the masks hold round(s * n) pruned entries per kernel,
    # so the measured sparsity is the target up to rounding.
    assert r["measured_sparsity"] == pytest.approx(r["sparsity"], abs=1e-3)
    assert len(r["trajectory"]["step"]) == r["epochs"] == 2
    assert r["wall_s"] > 0 and r["compile_s"] > 0
  # The one-shot cut and the end of the log ramp are at the same step.
  assert records[1]["end_step"] == records[2]["end_step"] > 0
  assert (tmp_path / "accuracy.png").stat().st_size > 0
  assert (tmp_path / "accuracy_steps.png").stat().st_size > 0


def test_chars_task_reports_perplexity(tmp_path, monkeypatch):
  # A one-block model: the task's code path at a third of the compile time.
  monkeypatch.setattr(accuracy, "CharTransformer", functools.partial(
      accuracy.CharTransformer, depth=1, width=16, context=16))
  out = tmp_path / "chars.json"
  result = accuracy.main([
      "--tasks", "chars", "--sparsities", "0.75", "--schedules", "cubic",
      "--seeds", "1", "--epochs", "1", "--out", str(out), "--no-plot",
  ])
  (record,) = result["records"]
  assert record["metric"] == "val_loss"
  assert record["perplexity_mean"] == pytest.approx(math.exp(record["mean"]))
  # One epoch: the cubic ramp ends at step 0 and prunes straight to 0.75.
  assert record["measured_sparsity"] == pytest.approx(0.75, abs=1e-3)
  # Only the Dense and attention kernels are pruned, not the two tables.
  assert record["prunable_params"] < record["params"] - (128 + 16) * 16


def test_mnist1d_is_made_locally():
  x_train, x_test, y_train, y_test = accuracy.load_mnist1d()
  assert x_train.shape == (4000, 40) and x_test.shape == (1000, 40)
  assert set(np.unique(y_train)) == set(range(10))
  assert x_train.dtype == np.float32 and y_test.dtype == np.int32


def test_rejects_unknown_names():
  with pytest.raises(SystemExit):
    accuracy.main(["--tasks", "cifar"])
  with pytest.raises(SystemExit):
    accuracy.main(["--schedules", "linear"])


def test_structured_benchmark_reports_entry_sparsity(tmp_path):
  from benchmarks import structured
  out, png = tmp_path / "structured.json", tmp_path / "structured.png"
  result = structured.main(["--tasks", "mnist1d", "--granularities", "2:4",
                            "--epochs", "1", "--out", str(out), "--plot", str(png)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  assert png.stat().st_size > 0
  by_name = {r["granularity"]: r for r in result["records"]}
  assert set(by_name) == {"dense", "2:4"}
  # Every group 2:4: exactly half of each kernel, read from the masks.
  assert by_name["2:4"]["sparsity"] == 1.0 and by_name["2:4"]["measured_sparsity"] == 0.5
  assert by_name["dense"]["measured_sparsity"] == 0.0
