"""Applies each edit of ``scripts/edits.py`` to a copy of the repository and
runs the test files that cover its module: an edit is *caught* when a test
fails, *missed* when all pass.

The working tree is never touched: its tracked files and untracked ones that
git does not ignore are copied into a temporary directory once, each edit is
written there, the mapped tests run (``pytest -x``, one process, a timeout
per edit) and the file is restored. The copy is what gets imported
(``PYTHONPATH`` and the working directory point at it; checked before the
first run), not the editable install of the working tree.

    .venv/bin/python scripts/check_edits.py                  # every edit
    .venv/bin/python scripts/check_edits.py --module _rules.py
    .venv/bin/python scripts/check_edits.py --only rules-drop-floor sparse-ste-dense-frozen
    .venv/bin/python scripts/check_edits.py --list
    .venv/bin/python scripts/check_edits.py --source d73c7c1 --report /tmp/before.json
    .venv/bin/python scripts/check_edits.py --only rules-drop-floor --tests tests/test_sparse.py

Writes a JSON report (``benchmarks/results/edits.json`` by default) and
prints a table. Exit status 1 if any edit is missed or fails to apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import edits as edits_module  # pylint: disable=wrong-import-position
from optax_prune import _tables  # pylint: disable=wrong-import-position

PYTEST = ("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0")


def repository_files(root: pathlib.Path) -> list[str]:
  """Tracked files and untracked ones git does not ignore (paths from ``root``)."""
  out = subprocess.run(
      ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
      cwd=root, check=True, capture_output=True).stdout
  return sorted({p for p in out.decode().split("\0") if p and (root / p).is_file()})


def copy_repository(root: pathlib.Path, dest: pathlib.Path, source: Optional[str] = None) -> None:
  """The working tree's files into ``dest``; or, with ``source`` (a git
  revision), the files committed there (to ask what an older suite caught)."""
  if source is not None:
    archive = subprocess.run(["git", "archive", "--format=tar", source], cwd=root,
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return
  for path in repository_files(root):
    target = dest / path
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / path, target)


def environment(copy: pathlib.Path) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = str(copy)
  # No bytecode: an edit of the same size written in the same second as the
  # original would otherwise be read from a stale .pyc.
  env["PYTHONDONTWRITEBYTECODE"] = "1"
  return env


def check_imports(python: str, copy: pathlib.Path) -> None:
  """Fails unless ``optax_prune`` and ``tests`` are imported from ``copy``."""
  code = ("import optax_prune, tests.helpers as h; "
          "print(optax_prune.__file__); print(h.__file__)")
  out = subprocess.run([python, "-c", code], cwd=copy, env=environment(copy),
                       check=True, capture_output=True, text=True).stdout.split()
  for path in out:
    if not pathlib.Path(path).resolve().is_relative_to(copy.resolve()):
      raise SystemExit(f"the copy is not what gets imported: {path} is outside {copy}")


@dataclasses.dataclass
class Result:
  name: str
  module: str
  status: str  # caught, missed, error-applying, timeout, equivalent
  seconds: float
  breaks: str
  detail: str = ""  # The first failing test, or why it could not run.


def _first_failure(output: str) -> str:
  for line in output.splitlines():
    if line.startswith(("FAILED ", "ERROR ")):
      return line.split(" - ")[0][:160]
  return output.strip().splitlines()[-1][:160] if output.strip() else ""


QUICK = False  # --quick: the doctests and the first mapped test file only.


def mapped_paths(module: str, copy: pathlib.Path) -> list[str]:
  """The module's mapped test files that exist in ``copy``, its doctests
  first (they are quick)."""
  paths = [p for p in edits_module.TESTS[module] if (copy / p).is_file()]
  if QUICK:
    tests = [p for p in paths if p.startswith("tests/")][:1]
    paths = [p for p in paths if not p.startswith("tests/")] + tests
  return sorted(paths, key=lambda p: not p.startswith("optax_prune/"))


def run_edit(edit, python: str, copy: pathlib.Path, timeout: float,
             tests: Optional[list[str]] = None) -> Result:
  started = time.perf_counter()
  module = os.path.basename(edit.module)
  result = lambda status, detail="": Result(
      edit.name, module, status, round(time.perf_counter() - started, 1), edit.breaks, detail)
  if edit.equivalent:
    return result("equivalent", edit.equivalent)
  path = copy / edit.module
  original = path.read_text()
  if original.count(edit.old) != 1:
    return result("error-applying", f"`old` occurs {original.count(edit.old)} times")
  path.write_text(original.replace(edit.old, edit.new))
  try:
    proc = subprocess.run([python, *PYTEST, *(tests or mapped_paths(module, copy))], cwd=copy,
                          env=environment(copy), capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return result("timeout", f"no failure within {timeout:g} s")
  finally:
    path.write_text(original)
  output = proc.stdout + proc.stderr
  if proc.returncode == 0:
    return result("missed")
  if proc.returncode == 1:
    return result("caught", _first_failure(output))
  # 2: interrupted (an import or collection error), 3/4: internal or usage errors.
  return result("caught" if proc.returncode == 2 else "error-applying",
                f"pytest exit {proc.returncode}: {_first_failure(output)}")


def run_baseline(modules, python: str, copy: pathlib.Path, timeout: float) -> dict:
  """pytest's exit status on the unedited copy, per module's test files."""
  out = {}
  for module in modules:
    proc = subprocess.run([python, *PYTEST, *mapped_paths(module, copy)], cwd=copy,
                          env=environment(copy), capture_output=True, text=True,
                          timeout=timeout)
    out[module] = proc.returncode
    if proc.returncode:
      print(f"baseline: {module}'s tests fail without any edit:"
            f" {_first_failure(proc.stdout + proc.stderr)}", file=sys.stderr)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", nargs="+", metavar="NAME", help="edits to run, by name")
  parser.add_argument("--module", nargs="+", metavar="FILE",
                      help="run the edits of these modules (_rules.py ...)")
  parser.add_argument("--list", action="store_true", help="list the edits and exit")
  parser.add_argument("--timeout", type=float, default=600, help="seconds per edit")
  parser.add_argument("--tests", nargs="+", metavar="PATH",
                      help="run these tests (pytest node ids) instead of the mapped ones,"
                           " e.g. to see a new test catch an edit")
  parser.add_argument("--source", metavar="REV",
                      help="test the files committed at this git revision instead of the"
                           " working tree (what did that suite catch?)")
  parser.add_argument("--quick", action="store_true",
                      help="a screen: run each module's doctests and first test file only")
  parser.add_argument("--baseline", action="store_true",
                      help="first run each module's tests without an edit (they must pass)")
  parser.add_argument("--report", help="the JSON report (default: benchmarks/results/"
                      "edits.json; none with --tests or --quick unless given)")
  parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
  args = parser.parse_args(argv)

  global QUICK
  QUICK = args.quick
  chosen = list(edits_module.EDITS)
  if args.module:
    wanted = {os.path.basename(m) for m in args.module}
    chosen = [e for e in chosen if os.path.basename(e.module) in wanted]
  if args.only:
    known = {e.name for e in edits_module.EDITS}
    unknown = sorted(set(args.only) - known)
    if unknown:
      parser.error(f"unknown edits: {unknown}")
    chosen = [e for e in chosen if e.name in set(args.only)]
  if args.list:
    rows = [(e.name, os.path.basename(e.module), "equivalent" if e.equivalent else "",
             e.breaks) for e in chosen]
    print(_tables.format_table(("name", "module", "", "breaks"), rows, left=4))
    return 0

  # A SIGTERM unwinds like Ctrl-C: the running pytest is killed and the copy removed.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  started = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="optax_prune_edits_") as tmp:
    copy = pathlib.Path(tmp)
    copy_repository(ROOT, copy, args.source)
    check_imports(args.python, copy)
    baseline = {}
    if args.baseline:
      baseline = run_baseline(sorted({os.path.basename(e.module) for e in chosen}),
                              args.python, copy, args.timeout)
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    results = []
    with tqdm(chosen, unit="edit") as bar:
      for edit in bar:
        bar.set_postfix_str(edit.name)
        results.append(run_edit(edit, args.python, copy, args.timeout, args.tests))
        if results[-1].status not in ("caught", "equivalent"):
          bar.write(f"{results[-1].status}: {edit.name} ({edit.breaks})")
  wall = time.perf_counter() - started

  rows = [(r.name, r.module, r.status, f"{r.seconds:.0f}", r.detail[:70]) for r in results]
  print(_tables.format_table(("edit", "module", "status", "s", "first failure / note"),
                             rows, left=3))
  counts = {s: sum(r.status == s for r in results)
            for s in ("caught", "missed", "error-applying", "timeout", "equivalent")}
  print(", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {wall:.0f} s")
  if args.report is None and (args.tests or args.quick):
    return 0 if counts["caught"] == len(results) - counts["equivalent"] else 1
  report = pathlib.Path(args.report or ROOT / "benchmarks" / "results" / "edits.json")
  report.parent.mkdir(parents=True, exist_ok=True)
  previous = json.loads(report.read_text()) if report.exists() and (args.only or args.module) else {}
  by_name = {r["name"]: r for r in previous.get("results", [])}
  by_name.update({r.name: dataclasses.asdict(r) for r in results})
  ordered = [by_name[e.name] for e in edits_module.EDITS if e.name in by_name]
  run = {"command": " ".join(["scripts/check_edits.py",
                               *(argv if argv is not None else sys.argv[1:])]),
         "wall_seconds": round(wall, 1), "edits": len(results)}
  report.write_text(json.dumps({
      # Runs merged into this report, oldest first (--only/--module add to it).
      "runs": previous.get("runs", []) + [run],
      "baseline": baseline,
      "counts": {s: sum(r["status"] == s for r in ordered) for s in counts},
      "results": ordered,
  }, indent=1) + "\n")
  print(f"report: {report}")
  return 1 if counts["missed"] or counts["error-applying"] or counts["timeout"] else 0


if __name__ == "__main__":
  sys.exit(main())
