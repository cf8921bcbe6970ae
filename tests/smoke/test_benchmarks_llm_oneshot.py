"""The LLM one-shot benchmark (magnitude, Wanda, SparseGPT; all at once and
sequential) runs end to end at a tiny size and saves well-formed JSON."""

import functools
import json
import math

import pytest

from benchmarks import accuracy
from benchmarks import llm_oneshot

ROWS = [("magnitude", "all at once"), ("wanda", "all at once"), ("wanda", "sequential"),
        ("sparsegpt", "all at once"), ("sparsegpt", "sequential")]


def test_json_is_well_formed(tmp_path, monkeypatch):
  # A one-block model of width 16 (as the chars task's smoke test): fewer and
  # smaller kernels to compile and prune; sequential still has a block and the head.
  monkeypatch.setattr(accuracy, "CharTransformer", functools.partial(
      accuracy.CharTransformer, depth=1, width=16, context=16))
  out = tmp_path / "llm_oneshot.json"
  result = llm_oneshot.main(["--quick", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["records"] == json.loads(json.dumps(result["records"]))
  assert saved["args"]["quick"] and saved["args"]["seeds"] == 1
  records = saved["records"]
  assert [(r["method"], r["order"]) for r in records] == ROWS
  dense = records[0]["dense_val_loss"]
  for r in records:
    assert r["config"] == "50%" and r["seed"] == 0
    assert r["dense_val_loss"] == dense
    assert math.isfinite(r["one_shot_val_loss"])
    assert r["one_shot_perplexity"] == pytest.approx(math.exp(r["one_shot_val_loss"]), rel=1e-6)
    assert r["dense_perplexity"] == pytest.approx(math.exp(dense), rel=1e-6)
    # Every method prunes every kernel to 50%.
    assert r["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert r["seconds"] > 0 and r["seconds_first"] >= r["seconds"] - 1e-9
    assert r["compile_seconds"] >= 0 and r["rss_rise_bytes"] >= 0
    # Magnitude holds no statistics; the others do.
    assert (r["held_bytes"] > 0) == (r["method"] != "magnitude")
  # Statistics-free magnitude is the same whichever order: run once.
  assert ("magnitude", "sequential") not in [(r["method"], r["order"]) for r in records]

  memory = saved["depth_memory"]
  assert [(m["depth"], m["order"]) for m in memory] == [(2, "sequential"), (2, "all at once")]
  sequential, at_once = memory
  # All at once holds every block's Hessians, sequential one block's.
  assert at_once["hessian_bytes"] == 2 * sequential["hessian_bytes"] > 0
  assert all(m["traced_peak_bytes"] > 0 and m["seconds"] > 0 for m in memory)


def test_rejects_an_unknown_config():
  with pytest.raises(SystemExit):
    llm_oneshot.main(["--configs", "60%"])
