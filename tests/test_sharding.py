"""Pruning sharded params on a device mesh, one process and two, without gathering.

Faked CPU devices are configured before JAX starts, so every check here runs in
a subprocess (``tests/sharding_checks.py``), leaving this process's JAX alone.
"""

import fcntl
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import sharding_checks

# One xdist worker for all where `--dist loadgroup` groups (pytest < 9); the
# 8-device subprocess runs once either way (see `mesh_results`).
pytestmark = pytest.mark.xdist_group("sharding")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Bounds that keep a stuck collective from hanging CI.
MESH_TIMEOUT_S = 300
WORKER_TIMEOUT_S = 180
# Checks known to fail, by name -> reason (strict xfails). None at present.
KNOWN_FAILURES: dict[str, str] = {}


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env.update(
      JAX_PLATFORMS="cpu",  # `-m` from ROOT puts the repository on the path.
      # Backend optimization level 0 halves compile time; what we check
      # (partitioning, collectives, exact masks) does not depend on it.
      XLA_FLAGS=(
          f"--xla_force_host_platform_device_count={devices}"
          " --xla_backend_optimization_level=0"
      ),
  )
  return env


def _output(proc_stdout: str, proc_stderr: str) -> str:
  return f"--- stdout ---\n{proc_stdout[-8000:]}\n--- stderr ---\n{proc_stderr[-8000:]}"


@pytest.fixture(scope="session")
def mesh_results(tmp_path_factory, worker_id):
  """The mesh checks' results, computed once per test session.

  xdist workers share the session's base folder: the first to take the lock
  runs the subprocess, the others read its file (under pytest 9 xdist's
  ``loadgroup`` no longer keeps a group on one worker).
  A failed run is stored too, so that it is not repeated.
  """
  root = tmp_path_factory.getbasetemp()
  root = root if worker_id == "master" else root.parent
  out, failure = root / "mesh_results.json", root / "mesh_results.failed"
  with open(root / "mesh_results.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not out.exists() and not failure.exists():
      proc = subprocess.run(
          [sys.executable, "-m", "tests.sharding_checks", "mesh", str(out)],
          cwd=ROOT, env=_env(8), capture_output=True, text=True,
          timeout=MESH_TIMEOUT_S, check=False,
      )
      if proc.returncode != 0 or not out.exists():
        out.unlink(missing_ok=True)
        failure.write_text(f"the mesh checks exited with {proc.returncode}\n"
                           + _output(proc.stdout, proc.stderr))
  if failure.exists():
    pytest.fail(failure.read_text(), pytrace=False)
  return json.loads(out.read_text())


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
          cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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
