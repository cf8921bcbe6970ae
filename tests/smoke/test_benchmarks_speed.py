"""The speed benchmarks run at a tiny size and write well-formed JSON.

No timing is asserted here: targets are read off the benchmark output.
"""

import json
import math

from benchmarks import compile_time
from benchmarks import mask_update
from benchmarks import step_overhead


def test_mask_update_writes_records(tmp_path):
  out, png = tmp_path / "mask.json", tmp_path / "mask.png"
  mask_update.main(["--sizes", "2e3", "5e3", "--repeats", "1", "--methods", "sort", "histogram",
                    "--out", str(out), "--plot", str(png)])
  payload = json.loads(out.read_text())
  assert payload["machine"]["jax"] and png.stat().st_size > 0
  records = payload["records"]
  configs = {(r["method"], r["scope"]) for r in records}
  assert configs == {(m, s) for m in ("sort", "histogram") for s in ("layer", "global")} | {
      ("yardstick:read", "-"), ("yardstick:sort", "-")}
  for r in records:
    assert r["params"] > 0 and r["seconds"] > 0 and math.isfinite(r["temp_bytes_per_param"])
  assert set(payload["exponents"]) >= {"histogram/layer", "sort/global"}


def test_step_overhead_writes_ratios(tmp_path):
  out = tmp_path / "step.json"
  # A two-kernel MLP: the step's pruning is most of the compile, and it grows with the kernels.
  step_overhead.main(["--batch-size", "4", "--repeats", "2", "--models", "tiny-mlp",
                      "--out", str(out)])
  records = json.loads(out.read_text())["records"]
  assert [r["model"] for r in records] == ["tiny-mlp"]
  for r in records:
    assert r["ratio"] == r["pruned_seconds"] / r["adam_seconds"] > 0
    assert r["static_ratio"] == r["static_seconds"] / r["adam_seconds"] > 0


def test_compile_time_runs_fresh_processes_and_reports_targets(tmp_path):
  out, png = tmp_path / "compile.json", tmp_path / "compile.png"
  compile_time.main(["--quick", "--repeats", "1", "--out", str(out), "--plot", str(png)])
  payload = json.loads(out.read_text())
  assert png.stat().st_size > 0
  records = {(r["model"], r["depth"], r["link"]): r for r in payload["records"]}
  assert set(records) == {("mlp", 2, "default"), ("mlp", 4, "adam"), ("mlp", 4, "default")}
  for (_, depth, link), r in records.items():
    assert r["status"] == "ok", r
    assert r["pruned_leaves"] == (0 if link == "adam" else depth)
    assert r["compile_s"] > 0 and r["hlo_chars"] > 0 and r["step_ms"] > 0
  targets = {t["target"] for t in payload["targets"]}
  assert {"default compile growth 2 -> 4 leaves <= 2.2x",
          "mlp-4 default: compile <= 3x adam + 1 s"} <= targets
  # A configuration past its limit is reported, not waited for.
  assert compile_time.run_child("mlp", 2, "default", 1, 0.01, None)["status"].startswith(
      "did not finish")
