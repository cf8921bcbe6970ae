"""Runs the 8-device mesh checks (``tests/sharding_checks.py mesh``) once per
test session, in a subprocess whose files live in the session's base folder.

The pytest controller starts it in the background when the session begins (see
``conftest.py``), so that it overlaps with the other tests instead of holding
an xdist worker; ``tests/test_sharding.py`` reads its results, or runs it
itself when nothing started it (a run of selected tests). No JAX import here.
"""

import fcntl
import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Bound that keeps a stuck collective from hanging CI (a run takes 1.5-2.5
# minutes beside two busy xdist workers on 2 cores).
TIMEOUT_S = 480


def env(devices: int) -> dict:
  out = dict(os.environ)
  out.update(
      JAX_PLATFORMS="cpu",  # `-m` from ROOT puts the repository on the path.
      # Backend optimization level 0 halves compile time; what we check
      # (partitioning, collectives, exact masks) does not depend on it.
      XLA_FLAGS=(
          f"--xla_force_host_platform_device_count={devices}"
          " --xla_backend_optimization_level=0"
      ),
  )
  return out


def _files(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """The results (JSON), the exit status and the output of a run in ``root``."""
  return root / "mesh_results.json", root / "mesh_results.rc", root / "mesh_results.log"


def _command(root: pathlib.Path) -> list[str]:
  out, rc, log = _files(root)
  # The shell records the exit status once the checks end, whoever waits.
  script = ('"$0" -m tests.sharding_checks mesh "$1" > "$3" 2>&1; echo $? > "$2.tmp";'
            ' mv "$2.tmp" "$2"')
  return ["sh", "-c", script, sys.executable, str(out), str(rc), str(log)]


def start(root: pathlib.Path) -> subprocess.Popen:
  """Starts the checks in the background; :func:`results` waits for them."""
  (root / "mesh_results.started").touch()
  return subprocess.Popen(_command(root), cwd=ROOT, env=env(8),
                          start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
  """Kills a run and the checks under its shell, and reaps it."""
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()


def results(root: pathlib.Path) -> tuple[bool, str]:
  """``(True, results JSON)`` or ``(False, why)``: waits for a run started by
  :func:`start`, or runs the checks (once for all xdist workers: a lock)."""
  out, rc, log = _files(root)
  with open(root / "mesh_results.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / "mesh_results.started").exists():
      (root / "mesh_results.started").touch()
      proc = subprocess.Popen(_command(root), cwd=ROOT, env=env(8),
                              start_new_session=True)
      try:
        proc.wait(timeout=TIMEOUT_S)
      except subprocess.TimeoutExpired:
        stop(proc)
        rc.write_text("timeout")
  deadline = time.monotonic() + TIMEOUT_S
  while not rc.exists():
    if time.monotonic() > deadline:
      return False, f"the mesh checks did not finish within {TIMEOUT_S} s"
    time.sleep(0.5)
  status = rc.read_text().strip()
  if status != "0" or not out.exists():
    text = log.read_text()[-16000:] if log.exists() else ""
    return False, f"the mesh checks exited with {status}\n{text}"
  return True, out.read_text()
