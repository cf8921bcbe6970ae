"""Trains a pruned model for a number of steps, optionally from a checkpoint.

Run by tests/test_checkpoint.py (a fresh process, or `main(argv)` in its own):
  python tests/checkpoint_run.py STEPS OUT_DIR [--save DIR [--save-at STEP]] [--restore DIR]
Each method runs in turn, in one process: gradual pruning with both mask layouts
(bool, packed), RigL and straight-through masks; OUT_DIR/METHOD.npz, checkpoints
under DIR/METHOD, taken after STEP of the STEPS steps (default: all of them).
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_prune

SCHEDULE = optax_prune.polynomial_schedule(0.8, begin_step=0, end_step=40, frequency=10)


METHODS = ("bool", "packed", "rigl", "ste")


def make_tx(method: str):
  adamw = optax.adamw(0.05, weight_decay=0.01)
  if method == "rigl":  # Drop and grow at 10, 20, 30, 40.
    return optax_prune.rigl(adamw, 0.8, end_step=50, frequency=10, seed=1)
  last = (optax_prune.straight_through(SCHEDULE) if method == "ste" else
          optax_prune.magnitude_pruning(SCHEDULE, packed_masks=method == "packed"))
  return optax.chain(adamw, last)


def initial_params():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
          "v": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
          "b": jnp.zeros(4, jnp.float32)}


def make_step(tx):
  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: sum(jnp.sum(jnp.sin(x) * x) for x in jax.tree.leaves(p)))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def run(steps: int, out: str, save, restore, method: str, save_at=None):
  tx = make_tx(method)
  step = make_step(tx)
  params = initial_params()
  state = tx.init(params)
  checkpointer = ocp.StandardCheckpointer()
  if restore:
    # Restore into the structure of a freshly built `tx.init(...)`.
    target = {"params": params, "opt_state": state}
    restored = checkpointer.restore(restore, target)
    params, state = restored["params"], restored["opt_state"]
  save_at = steps if save_at is None else save_at
  for i in range(steps + 1):
    if save and i == save_at:
      checkpointer.save(save, {"params": params, "opt_state": state})
      checkpointer.wait_until_finished()
    if i < steps:
      params, state = step(params, state)
  pstate = optax_prune.find_pruning_state(state)
  np.savez(out, count=np.asarray(pstate.count),
           **{f"param_{k}": np.asarray(v) for k, v in params.items()},
           **{f"mask_{k}": np.asarray(pstate.masks[k]) for k in ("w", "v")},
           **{f"bool_mask_{k}": np.asarray(m) for k, m in
              optax_prune.unpack_masks(pstate.masks, params).items() if k in ("w", "v")})


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("steps", type=int)
  parser.add_argument("out_dir")
  parser.add_argument("--save")
  parser.add_argument("--save-at", type=int, help="steps before the checkpoint (default: STEPS)")
  parser.add_argument("--restore")
  args = parser.parse_args(argv)
  for method in METHODS:
    under = lambda folder: folder and os.path.join(folder, method)
    run(args.steps, os.path.join(args.out_dir, f"{method}.npz"), under(args.save),
        under(args.restore), method, args.save_at)


if __name__ == "__main__":
  main()
