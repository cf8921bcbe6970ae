"""The one-shot structured benchmark runs end to end at a tiny size: every
importance is run (or skipped with its reason), shrunk models compute the masked
ones' outputs, and each group keeps exactly C - round(s C) channels."""

import json

from benchmarks import structured_oneshot


def test_every_importance_shrinks_exactly_and_json_is_well_formed(tmp_path):
  out = tmp_path / "structured_oneshot.json"
  # 0.3 of 64 channels is 19.2: 19 pruned, 45 kept in each convolution.
  result = structured_oneshot.main(["--tasks", "mnist1d", "--epochs", "2", "--fractions", "0.3",
                                    "--finetune-steps", "3", "--calibration-batches", "2",
                                    "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["records"] == json.loads(json.dumps(result["records"]))
  assert saved["importances"] == ["weight", "bn_scale", "taylor", "activation"]
  records = saved["records"]
  assert [r["method"] for r in records] == ["dense", "one-shot", "one-shot", "one-shot", "gradual"]
  dense, *one_shot, gradual = records
  # The 1D CNN has no BatchNorm: bn_scale is skipped, and says why.
  skipped = saved["analyses"]["mnist1d"]["skipped"]
  assert skipped == {"bn_scale": "no pruned group has a BatchNorm scale"}
  assert saved["analyses"]["mnist1d"]["bn_scale_groups"] == []
  ran = [r["importance"] for r in one_shot]
  assert sorted(ran + list(skipped)) == sorted(saved["importances"])
  sizes = saved["analyses"]["mnist1d"]["sizes"]
  assert sorted(sizes.values()) == [64, 64, 64]
  for r in one_shot + [gradual]:
    assert r["sizes"] == {name: 45 for name in sizes}
    assert r["max_abs_diff"] < 1e-4
    assert r["params"] < dense["params"]
    assert 0.0 <= r["finetuned"] <= 1.0
  for r in one_shot:
    assert r["max_abs_diff_finetuned"] < 1e-4
    assert 0.0 <= r["one_shot"] <= 1.0
    # The shrunk model scores what the masked one does.
    assert abs(r["shrunk_one_shot"] - r["one_shot"]) <= 1e-3
    assert r["params"] == gradual["params"]
  assert (tmp_path / "structured_oneshot.png").stat().st_size > 0
