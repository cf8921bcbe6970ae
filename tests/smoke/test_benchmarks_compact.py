"""The compact-size benchmark runs, round-trips exactly, and beats dense orbax on disk."""

import json

from benchmarks import compact_sizes


def test_compact_sizes_beat_dense_checkpoints(tmp_path):
  out = tmp_path / "compact.json"
  # One configuration (compiling the pruning step takes most of the time):
  # 2:4 stores kernels both ways, N:M and bits.
  result = compact_sizes.main(["--configs", "2:4", "--saves", "1", "--out", str(out)])
  records = {r["config"]: r for r in result["records"]}
  assert json.loads(out.read_text())["records"] == list(records.values())
  for r in records.values():
    assert r["compact_exact"]  # Loaded back bit for bit, masks included.
    # In memory: kept values + 1 bit per pruned-leaf entry, headers aside.
    assert r["compact_bytes"] < (1 - r["masked_sparsity"] + 1 / 32 + 0.01) * r["dense_bytes"]
    assert r["packed_mask_bytes"] * 7 < r["bool_mask_bytes"]
  nm = records["2:4"]
  # On disk, below orbax's own (zero-compressing) checkpoint of the dense params.
  assert nm["compact_orbax_bytes"] < 0.95 * nm["dense_orbax_bytes"]
  assert nm["nm_compact_exact"] and nm["nm_leaves"] == 3
  assert nm["nm_compact_bytes"] < 0.66 * nm["dense_bytes"]
