"""The main job runs end to end at a tiny size."""

from benchmarks import demo_digits


def test_demo_runs_and_prunes_to_target():
  result = demo_digits.main(["--epochs", "2", "--sparsity", "0.5"])
  assert abs(result["final_sparsity"] - 0.5) < 1e-3
  assert 0.0 <= result["pruned_accuracy"] <= 1.0
  assert result["train_step_traces"] == 2  # One per optimizer: no recompiles.
