"""The export-size benchmark runs and its figures follow the formats' formulas."""

import json

from benchmarks import export_sizes


def test_export_sizes_match_the_formats(tmp_path):
  out = tmp_path / "export.json"
  configs = ["unstructured 0.9", "2:4"]
  result = export_sizes.main(["--configs", *configs, "--out", str(out)])
  records = {r["config"]: r for r in result["records"]}
  assert json.loads(out.read_text())["records"] == list(records.values())
  for r in records.values():
    assert r["max_relative_matmul_error"] < 1e-5  # Sparse matmuls equal masked dense ones.
  # More kept entries, more BCOO bytes; 2:4 packs to about n/m * (4 + 1) / 4 of dense.
  # 10% kept: 4 B values plus int32 indices per axis, far below dense.
  assert records["unstructured 0.9"]["bcoo_bytes"] < 0.4 * records["unstructured 0.9"]["dense_bytes"]
  nm = records["2:4"]
  assert nm["nm_bytes"] < nm["dense_bytes"] < nm["bcoo_bytes"]
  assert abs(nm["masked_sparsity"] - 0.5) < 1e-9
