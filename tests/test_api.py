"""The public API: `__all__` matches the exports; every name is documented."""

import inspect

import optax_prune


def test_all_matches_public_names():
  public = {n for n in dir(optax_prune) if not n.startswith("_")}
  modules = {n for n in public if inspect.ismodule(getattr(optax_prune, n))}
  assert set(optax_prune.__all__) == public - modules


def test_every_public_name_has_a_docstring_with_an_example():
  for name in optax_prune.__all__:
    obj = getattr(optax_prune, name)
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{name} has no docstring"
    if inspect.isfunction(obj):
      assert ">>>" in doc, f"{name} has no example"


def _readme_blocks():
  import pathlib
  import re
  readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  return re.findall(r"```python\n(.*?)```", readme, re.S)


def test_readme_quickstart_runs():
  blocks = _readme_blocks()
  assert blocks, "README has no python example"
  exec(compile(blocks[0], "README quickstart", "exec"), {})


def test_readme_static_mask_step_example_runs():
  (block,) = [b for b in _readme_blocks() if "mask_update_steps(" in b]
  scope = {}
  exec(compile(block, "README update_masks example", "exec"), scope)
  assert scope["due"] == {0, 100, 200, 300}
  state = optax_prune.find_pruning_state(scope["opt_state"])
  assert int(state.count) == 400 and int(state.skipped_mask_updates) == 0
  summary = optax_prune.sparsity_summary(scope["params"], scope["opt_state"])
  assert summary.pruned == round(0.9 * 64 * 64) and "WARNING" not in str(summary)


def test_readme_sparse_training_example_runs(capsys):
  (block,) = [b for b in _readme_blocks() if "optax_prune.rigl(" in b]
  exec(compile(block, "README sparse training example", "exec"), {})
  lines = capsys.readouterr().out.split("\n")
  names = [line.split()[0] for line in lines if line]
  assert names == ["rigl", "set", "static", "ste"]
  for line in filter(None, lines):
    assert line.split()[-1] == str(round(0.9 * 64 * 64))


def test_readme_shrink_example_runs(capsys):
  (block,) = [b for b in _readme_blocks() if "optax_prune.shrink(" in b]
  scope = {}
  exec(compile(block, "README shrink example", "exec"), scope)
  assert scope["widths"] == (32, 32)
  out = capsys.readouterr().out
  assert out.count("prunable") == 2 and "an input of the model" in out


def test_readme_scanned_stack_example_runs():
  (block,) = [b for b in _readme_blocks() if "layer_axis=layers" in b]
  scope = {}
  exec(compile(block, "README scanned stack example", "exec"), scope)
  state = optax_prune.find_pruning_state(scope["opt_state"])
  assert state.pruned_units.tolist() == [320] + [2048] * 12
