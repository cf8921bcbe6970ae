"""The notebooks run top to bottom in a fresh kernel."""

import json
import pathlib
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
# Per cell; a whole notebook takes a few seconds, most of it imports.
CELL_TIMEOUT_S = 60


def execute(name: str) -> list[str]:
  """Runs notebooks/`name` from notebooks/; returns each code cell's text."""
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  # "python3" is ipykernel's own kernelspec; jupyter_client starts it with
  # `sys.executable`, so the kernel is this interpreter (the venv's python)
  # without a `jupyter kernelspec install` step.
  nbclient.NotebookClient(
      notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOKS)}},
  ).execute()
  texts = []
  for cell in notebook.cells:
    if cell.cell_type == "code":
      texts.append("".join(
          out.get("text", "") + out.get("data", {}).get("text/plain", "")
          for out in cell.outputs
      ))
  return texts


def test_notebooks_are_stored_with_their_outputs():
  # So that a viewer sees the tables and plots; `make notebooks` refreshes them.
  for path in NOTEBOOKS.glob("*.ipynb"):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), path.name
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), path.name
    assert any(c.outputs for c in code), path.name
  results = nbformat.read(NOTEBOOKS / "results.ipynb", as_version=4)
  assert any("image/png" in out.get("data", {})
             for c in results.cells if c.cell_type == "code" for out in c.outputs)


def test_quickstart_runs():
  texts = execute("quickstart.ipynb")
  output = "\n".join(texts)
  assert "masked leaves" in output  # The sparsity_summary table.
  assert "all exactly zero" in output
  assert "nm_matmul equals the masked dense matmul" in output  # The 2:4 section.


def test_oneshot_and_sensitivity_runs():
  output = "\n".join(execute("oneshot_and_sensitivity.ipynb"))
  assert "magnitude   wanda" in output and "2:4" in output  # The one-shot table.
  assert "loss increase when one leaf is pruned" in output  # The sensitivity report.
  for name in ("uniform", "erk", "global", "sensitivity"):
    assert f"{name}: 0.900 of the kernels pruned" in output  # Exact totals, each allocation.
  assert "pruned weights revived: 0" in output  # The fine-tune kept the masks.


def test_kernel_is_this_python():
  notebook = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell("import sys; print(sys.executable)")
  ])
  nbclient.NotebookClient(
      notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3"
  ).execute()
  assert notebook.cells[0].outputs[0]["text"].strip() == sys.executable


def test_results_runs_on_saved_results():
  # Whatever benchmarks/results holds (possibly nothing): missing files are
  # skipped with a message, not an error.
  execute("results.ipynb")


def test_results_draws_every_section(tmp_path, monkeypatch):
  trajectory = {"epoch_start_step": [0, 10], "target_sparsity": [0.0, 0.9],
                "step": [9, 19], "measured_sparsity": [0.0, 0.9]}
  records = [
      {"task": task, "schedule": schedule, "sparsity": sparsity,
       "metric": "test_accuracy" if task == "digits" else "val_loss",
       "values": [0.9, 0.92], "mean": 0.91, "std": 0.014,
       "measured_sparsity": sparsity, "wall_s": 1.0,
       "perplexity_mean": 2.5, "perplexity_std": 0.1,
       "trajectory": trajectory}
      for task in ("digits", "chars")
      for schedule, sparsity in (("dense", 0.0), ("log", 0.9), ("one-shot", 0.9))
  ]
  (tmp_path / "accuracy.json").write_text(json.dumps({
      "header": {"command": "python -m benchmarks.accuracy", "platform": "test",
                 "cpu_count": 2, "jax": "0", "date_utc": "now",
                 "total_wall_s": 1.0},
      "records": records,
      "targets": [{"target": "0.9 within 1.0 pp of dense", "task": "digits",
                   "schedule": "log", "gap_pp": 0.5, "seeds": 2, "met": True}],
  }))
  (tmp_path / "mask_update.json").write_text(json.dumps({"records": [
      {"method": method, "scope": "layer", "params": n, "seconds": n * 1e-9,
       "temp_bytes_per_param": 4.0}
      for method in ("sort", "bisect") for n in (1000, 100000)
  ]}))
  (tmp_path / "structured.json").write_text(json.dumps({"records": [
      {"task": "digits", "granularity": g, "sparsity": s, "measured_sparsity": m,
       "mean": 0.98, "std": 0.001}
      for g, s, m in (("dense", 0.0, 0.0), ("2:4", 1.0, 0.5), ("blocks4x4", 0.5, 0.51))]}))
  window = {"median_step_seconds": 0.01, "live_array_bytes": 10, "resident_bytes": 2**20}
  (tmp_path / "soak.json").write_text(json.dumps({
      "records": [dict(window, end_step=100 * i) for i in (1, 2, 3)],
      "summary": {"traces": 1, "live_array_bytes_min": 10, "live_array_bytes_max": 10,
                  "resident_growth_second_half_bytes": 0}}))
  (tmp_path / "export_sizes.json").write_text(json.dumps({"records": [
      {"config": "2:4", "masked_sparsity": 0.5, "dense_bytes": 100, "bcoo_bytes": 160,
       "nm_bytes": 63}]}))
  monkeypatch.setenv("OPTAX_PRUNE_RESULTS", str(tmp_path))
  texts = execute("results.ipynb")
  output = "\n".join(texts)
  assert "not found" not in output
  assert "blocks4x4" in output and "traces: 1" in output and "2:4" in output
  assert "dense - pruned = +0.50 pp" in output
  # Accuracy, trajectories, mask updates, structured, soak.
  assert output.count("<Figure") == 5
