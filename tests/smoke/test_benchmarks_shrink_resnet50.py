"""The ResNet-50 shrink benchmark runs end to end at its quick size (TinyResNet,
the same literal-width code at one block per stage): the shrunk callables compute
the masked model's outputs, get smaller with the fraction, and are timed."""

import json

from benchmarks import shrink_resnet50


def test_shrunk_resnet_gets_smaller_with_the_fraction_and_json_is_well_formed(tmp_path):
  out = tmp_path / "shrink_resnet50.json"
  # Two fractions: each `prune` compiles its own mask update (most of the test's time).
  result = shrink_resnet50.main(["--quick", "--fractions", "0.25,0.75", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["records"] == json.loads(json.dumps(result["records"]))
  assert saved["model"] == "TinyResNet" and saved["input_shape"] == [2, 32, 32, 3]
  dense, s25, s75 = saved["records"]
  assert [r["model"] for r in saved["records"]] == ["dense", "s25", "s75"]
  assert dense["params"] > s25["params"] > s75["params"]
  assert dense["flops"] > s25["flops"] > s75["flops"] > 0
  assert dense["state"] > s25["state"] > s75["state"]
  # 8 channels (the stem) less a quarter: 6 kept; less three quarters: 2.
  assert s25["sizes"]["['Conv_0']['kernel'][axis 3]"] == 6
  assert s75["sizes"]["['Conv_0']['kernel'][axis 3]"] == 2
  assert saved["prunable_groups"] == len(s25["sizes"]) == 7
  for r in (s25, s75):
    # Pruned without recalibration, the outputs grow: the difference is relative to them.
    assert r["finite"] and r["max_abs_diff"] <= 1e-5 * r["output_max_abs"] + 1e-5
    assert r["prune_s"] > 0 and r["prune_again_s"] > 0 and r["shrink_s"] > 0
  for r in saved["records"]:
    assert r["forward_s"] > 0 and r["speedup"] > 0 and len(r["forward_all_s"]) == 2
  assert saved["channel_groups_s"] > 0
