"""Pruning sharded params on a device mesh, one process and two, without gathering.

Faked CPU devices are configured before JAX starts, so every check here runs in
a subprocess (``tests/sharding_checks.py``), leaving this process's JAX alone.
"""

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import mesh_run
from tests import sharding_checks

# One xdist worker for all where `--dist loadgroup` groups (pytest < 9); the
# 8-device subprocess runs once either way (see `mesh_results`).
pytestmark = pytest.mark.xdist_group("sharding")

ROOT = mesh_run.ROOT
# Bound that keeps a stuck collective from hanging CI.
WORKER_TIMEOUT_S = 180
# Checks known to fail, by name -> reason (strict xfails). None at present.
KNOWN_FAILURES: dict[str, str] = {}


def _output(proc_stdout: str, proc_stderr: str) -> str:
  return f"--- stdout ---\n{proc_stdout[-8000:]}\n--- stderr ---\n{proc_stderr[-8000:]}"


@pytest.fixture(scope="session")
def mesh_results(tmp_path_factory, worker_id):
  """The mesh checks' results, computed once per test session.

  The pytest controller starts them in the background at the session's start
  (``conftest.py``); xdist workers share the session's base folder and wait
  for that run's files, or run it once under a lock when nothing started it.
  A failed run is reported by every test that reads it, never repeated.
  """
  root = tmp_path_factory.getbasetemp()
  root = root if worker_id == "master" else root.parent
  ok, text = mesh_run.results(root)
  if not ok:
    pytest.fail(text, pytrace=False)
  return json.loads(text)


def _params(names):
  return [
      pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[n], strict=True))
      if n in KNOWN_FAILURES else n
      for n in names
  ]


@pytest.mark.parametrize("name", _params(sharding_checks.check_names()))
def test_on_8_device_mesh(mesh_results, name):
  """masks-*: masks (and params) equal to one device and to NumPy; shardings-*:
  state placed like the params, step compiled once; no-gather-*: only counts
  cross devices; memory-*: per-device temporaries shrink with the shard;
  structured-*: N:M, block and channel masks (magnitude, saliency, random
  scores) equal to one device."""
  result = mesh_results["checks"][name]
  assert result["ok"], result["detail"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_hold_identical_masks_equal_to_one_device(tmp_path):
  port = _free_port()
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "tests.sharding_checks", "worker", str(i),
           str(port), str(tmp_path)],
          cwd=ROOT, env=mesh_run.env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  outputs, deadline = [], time.monotonic() + WORKER_TIMEOUT_S
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=max(1, deadline - time.monotonic())))
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    logs = [_output(*proc.communicate()) for proc in procs]
    pytest.fail(f"the workers timed out after {WORKER_TIMEOUT_S} s\n" + "\n".join(logs))
  codes = [proc.returncode for proc in procs]
  logs = "\n".join(f"=== process {i} (exit {c}) ===\n{_output(*o)}"
                   for i, (c, o) in enumerate(zip(codes, outputs)))
  if sharding_checks.SKIP_EXIT_CODE in codes:
    reason = [l for o, _ in outputs for l in o.splitlines() if l.startswith("SKIP")]
    pytest.skip(reason[0] if reason else "CPU collectives across processes unavailable")
  assert codes == [0, 0], logs

  runs = [np.load(tmp_path / f"process{i}.npz") for i in range(2)]
  assert sorted(runs[0].files) == sorted(runs[1].files)
  for key in runs[0].files:  # Both processes hold the same gathered state.
    np.testing.assert_array_equal(runs[0][key], runs[1][key], err_msg=key)
  for key in runs[0].files:
    if key.startswith("sharded/masks/"):
      single = runs[0][key.replace("sharded/", "single/")]
      np.testing.assert_array_equal(runs[0][key], single, err_msg=key)
      assert 0 < single.mean() < 1, key  # Pruned, not trivially.
    elif key.startswith("sharded/params/"):
      # Sharded matmuls may sum in another order: close, not bitwise.
      single = runs[0][key.replace("sharded/", "single/")]
      np.testing.assert_allclose(runs[0][key], single, rtol=1e-5, atol=1e-6, err_msg=key)
  for i in range(2):
    placement = json.loads((tmp_path / f"process{i}.json").read_text())
    assert not placement["placement_problems"], placement
