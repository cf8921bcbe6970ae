"""The soak benchmark runs a few windows and writes well-formed JSON and a plot.

No growth is asserted here: the figures of the full run are in RESULTS.md.
"""

import json

from benchmarks import soak


def test_soak_writes_windows_and_summary(tmp_path):
  out, png = tmp_path / "soak.json", tmp_path / "soak.png"
  summary = soak.main(["--steps", "60", "--frequency", "20", "--window", "20",
                       "--batch-size", "8", "--out", str(out), "--plot", str(png)])
  payload = json.loads(out.read_text())
  assert [w["end_step"] for w in payload["records"]] == [20, 40, 60]
  assert payload["summary"] == summary and png.stat().st_size > 0
  assert summary["traces"] == 1  # One compiled step for the whole run.
  # The schedule's last update (step 59) reaches the target, read from the masks.
  assert abs(summary["final_masked_sparsity"] - 0.9) < 1e-3
  for w in payload["records"]:
    assert w["median_step_seconds"] > 0 and w["live_array_bytes"] > 0
