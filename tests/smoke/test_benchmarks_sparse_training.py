"""The sparse-training benchmark runs end to end at a tiny size and saves well-formed JSON."""

import json

import pytest

from benchmarks import sparse_training


def test_json_is_well_formed(tmp_path):
  out = tmp_path / "sparse_training.json"
  result = sparse_training.main([
      "--tasks", "mnist1d", "--sparsities", "0.8", "--methods", "rigl,ste",
      "--seeds", "1", "--epochs", "2", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["records"] == json.loads(json.dumps(result["records"]))
  assert saved["methods"] == ["dense", "rigl", "ste"] and "--epochs 2" in saved["command"]
  records = saved["records"]
  assert [(r["method"], r["sparsity"]) for r in records] == [
      ("dense", 0.0), ("rigl", 0.8), ("ste", 0.8)]
  for r in records:
    assert 0.0 <= r["value"] <= 1.0 and r["wall_s"] > 0
    # Exact ERK counts: round(0.8 * N) of the kernels' N entries.
    assert r["measured_sparsity"] == pytest.approx(r["sparsity"], abs=1e-3)
  assert (tmp_path / "sparse_training.png").stat().st_size > 0
