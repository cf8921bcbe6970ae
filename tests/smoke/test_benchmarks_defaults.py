"""The allocation benchmark behind the default runs at a tiny size and saves well-formed JSON."""

import json

import pytest

from benchmarks import defaults


def test_json_is_well_formed(tmp_path):
  out, png = tmp_path / "defaults.json", tmp_path / "defaults.png"
  result = defaults.main(["--tasks", "digits", "--seeds", "1", "--epochs", "2",
                          "--sparsities", "0.9", "--allocations", "uniform,erk",
                          "--out", str(out), "--plot", str(png)])
  saved = json.loads(out.read_text())
  assert saved["records"] == json.loads(json.dumps(result["records"]))
  assert "--epochs 2" in saved["command"] and png.stat().st_size > 0
  uniform, erk = saved["records"]
  assert (uniform["allocation"], erk["allocation"]) == ("uniform", "erk")
  for r in (uniform, erk):
    # Both prune the same total of the four kernels, from the masks.
    assert r["measured_sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert 0.0 <= r["value"] <= 1.0 and r["collapsed_leaves"] == 0
    assert len(r["per_leaf"]) == 4
  assert all(s == pytest.approx(0.9, abs=1e-2) for s in uniform["per_leaf"].values())
  # ERK: the small first convolution denser than the total, a large kernel sparser.
  assert min(erk["per_leaf"].values()) < 0.9 < max(erk["per_leaf"].values())


def test_rejects_unknown_names_and_sparsities_past_the_sweep():
  with pytest.raises(SystemExit):
    defaults.main(["--allocations", "random"])
  with pytest.raises(SystemExit):
    defaults.main(["--sparsities", "0.99"])
