"""The list of behaviour-breaking edits (scripts/edits.py) stays applicable:
every `old` string occurs exactly once in its module, the mapped test files
exist, and every module has at least three edits. No JAX: well under 1 s."""

import collections
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _edits():
  spec = importlib.util.spec_from_file_location("edits", ROOT / "scripts" / "edits.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["edits"] = module  # dataclasses look their module up.
  spec.loader.exec_module(module)
  return module


EDITS = _edits()


def test_every_edit_applies_exactly_once_and_changes_its_module():
  names = collections.Counter(e.name for e in EDITS.EDITS)
  assert not [n for n, c in names.items() if c > 1], "edit names must be unique"
  for e in EDITS.EDITS:
    text = (ROOT / e.module).read_text()
    assert text.count(e.old) == 1, f"{e.name}: `old` occurs {text.count(e.old)} times in {e.module}"
    assert e.old != e.new, e.name
    assert e.breaks.strip() and "\n" not in e.breaks, f"{e.name}: one line on what it breaks"


def test_every_module_is_mapped_to_existing_test_files():
  for module, paths in EDITS.TESTS.items():
    assert (ROOT / "optax_prune" / module).is_file(), module
    assert paths, module
    for path in paths:
      assert (ROOT / path).is_file(), f"{module}: {path} does not exist"
  for e in EDITS.EDITS:
    assert e.module == f"optax_prune/{pathlib.Path(e.module).name}", e.name
    assert pathlib.Path(e.module).name in EDITS.TESTS, f"{e.name}: its module has no tests mapped"


def test_every_module_has_at_least_three_edits():
  per_module = collections.Counter(pathlib.Path(e.module).name for e in EDITS.EDITS)
  modules = sorted(p.name for p in (ROOT / "optax_prune").glob("*.py"))
  for module in modules:
    if module in EDITS.PENDING and not per_module[module]:
      continue  # Its edits are added with the module's own work.
    assert per_module[module] >= 3, f"{module} has {per_module[module]} edits, needs 3"
  assert len(EDITS.EDITS) >= 66
  equivalent = [e for e in EDITS.EDITS if e.equivalent]
  assert len(equivalent) <= len(EDITS.EDITS) // 10, "equivalent edits should stay few"
