"""Exact resume from an orbax checkpoint taken between two mask updates."""

import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import optax_prune
from tests import checkpoint_run

SCRIPT = pathlib.Path(__file__).parent / "checkpoint_run.py"
ROOT = SCRIPT.parent.parent


def _start(*args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT)


def _wait(*procs: subprocess.Popen) -> None:
  for proc in procs:
    assert proc.wait(timeout=300) == 0, proc.args


def _run(*args):
  _wait(_start(*args))


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path):
  # Each run does every method of checkpoint_run.py (pruning with bool and
  # packed masks, RigL, straight-through). Step 25 lies between the mask
  # updates at 20 and 30.
  runs = {name: tmp_path / name for name in ("straight", "resumed")}
  for folder in runs.values():
    folder.mkdir()
  # The straight run, here, takes the checkpoint on its way; the resumed run
  # restores it in a new process.
  checkpoint_run.main(list(map(str, (60, runs["straight"], "--save", tmp_path / "ckpt",
                                     "--save-at", 25))))
  _run(35, runs["resumed"], "--restore", tmp_path / "ckpt")
  for layout in ("bool", "packed", "rigl", "ste"):
    straight = np.load(runs["straight"] / f"{layout}.npz")
    resumed = np.load(runs["resumed"] / f"{layout}.npz")
    assert int(resumed["count"]) == 60
    assert resumed["mask_w"].dtype == (np.uint8 if layout == "packed" else bool)
    assert 0 < resumed["bool_mask_w"].mean() < 1
    for key in straight.files:
      np.testing.assert_array_equal(resumed[key], straight[key], err_msg=f"{layout}: {key}")


def test_restoring_a_state_for_another_tree_is_a_clear_error(tmp_path):
  tx = optax_prune.magnitude_pruning(0.5)
  params = {"w": jnp.ones((4, 4))}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"opt_state": tx.init(params)})
  checkpointer.wait_until_finished()
  other = {"w": jnp.ones((4, 4)), "u": jnp.ones((3, 3))}
  with pytest.raises(Exception):
    checkpointer.restore(tmp_path / "ckpt", {"opt_state": tx.init(other)})
  # Restored without a target, the state holds no MaskedNodes: the
  # transformation names the mismatch instead of failing inside jit.
  raw = checkpointer.restore(tmp_path / "ckpt")["opt_state"]
  state = optax_prune.MagnitudePruningState(**raw) if isinstance(raw, dict) else raw
  with pytest.raises(ValueError, match="do not match the pruning state"):
    tx.update(other, state, other)
