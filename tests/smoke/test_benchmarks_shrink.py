"""The shrink benchmark runs end to end at a tiny size: the shrunk model computes
the masked one's outputs and is as large as the unstructured one's nonzeros."""

import json

import pytest

from benchmarks import shrink


def test_shrunk_equals_masked_and_json_is_well_formed(tmp_path):
  out = tmp_path / "shrink.json"
  result = shrink.main(["--tasks", "mnist1d", "--epochs", "2", "--fractions", "0.5",
                        "--repeats", "2", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["records"] == json.loads(json.dumps(result["records"]))
  dense, shrunk, unstructured = saved["records"]
  assert [r["method"] for r in saved["records"]] == ["dense", "shrunk", "unstructured"]
  assert shrunk["max_abs_diff"] < 1e-4
  # Each convolution loses half its channels (Conv_2's with the flattened Dense rows).
  assert sorted(shrunk["sizes"].values()) == [32, 32, 32]
  assert shrunk["params"] < dense["params"]
  assert unstructured["params"] == pytest.approx(shrunk["params"], rel=1e-3)
  assert shrunk["speedup"] > 0 and unstructured["speedup"] == 1.0
  assert "a flatten of channels and positions" in saved["analyses"]["mnist1d"]["groups"]
  assert (tmp_path / "shrink.png").stat().st_size > 0
