"""Why straight-through masks lose on the character transformer: mask churn.

Run as ``python -m benchmarks.ste_churn`` (about 2 minutes on 2 CPU cores).
Trains the character transformer of ``benchmarks.accuracy`` for 8 epochs with
``chain(adam, straight_through(cubic to 0.8, ERK))`` as in
``benchmarks.sparse_training`` (the ramp ends at 2/3 of the epochs) and after
each epoch reports the sparsity, the fraction of kept weights that came back
at that epoch's mask update, the mean ``|w|`` of the dense weights that are
kept and of those that are pruned (which keep training on gradients taken at
0), and the validation loss. Saves ``benchmarks/results/ste_churn.json``.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import jax
import numpy as np
import optax
from flax.training import train_state

import optax_prune
from benchmarks import _common
from benchmarks import accuracy


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.ste_churn",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument("--learning-rate", type=float, help="default: the task's (3e-3)")
  parser.add_argument("--out", default=str(_common.RESULTS / "ste_churn.json"))
  args = parser.parse_args(argv)
  task = accuracy.make_task("chars")
  steps, lr = task.steps_per_epoch, args.learning_rate or task.learning_rate
  end = min(max(1, round(args.epochs * accuracy.END_FRACTION)), args.epochs - 1) * steps
  cubic = optax_prune.polynomial_schedule(0.8, begin_step=0, end_step=end, frequency=steps)
  tx = optax.chain(optax.adam(lr), optax_prune.straight_through(
      cubic, where=task.where, distribution="erk"))
  params = jax.jit(task.model.init)(jax.random.key(0), task.example())["params"]
  state = train_state.TrainState.create(apply_fn=task.model.apply, params=params, tx=tx)
  train_step, rng = accuracy.make_train_step(task), np.random.default_rng(0)
  records, old = [], None
  for epoch in range(args.epochs):
    for x, y in zip(*task.epoch_batches(rng)):
      state = train_step(state, x, y)
    masks = [np.asarray(m) for m in jax.tree.leaves(
        optax_prune.find_pruning_state(state.opt_state).masks)]
    dense = [np.asarray(d) for d in jax.tree.leaves(state.opt_state[1].dense)]
    kept = sum(int(m.sum()) for m in masks)
    pruned_values = np.concatenate([np.abs(d[~m]) for d, m in zip(dense, masks)])
    records.append({
        "epoch": epoch,
        "sparsity": 1 - kept / sum(m.size for m in masks),
        "regrown_fraction_of_kept": (
            0.0 if old is None else sum(int((m & ~o).sum()) for m, o in zip(masks, old)) / kept),
        "mean_abs_dense_kept": float(np.mean(np.concatenate(
            [np.abs(d[m]) for d, m in zip(dense, masks)]))),
        "mean_abs_dense_pruned": float(pruned_values.mean()) if pruned_values.size else 0.0,
        "val_loss": task.evaluate(state.params),
    })
    old = masks
  print(_common.table(
      [(str(r["epoch"]), f"{r['sparsity']:.3f}", f"{r['regrown_fraction_of_kept']:.3f}",
        f"{r['mean_abs_dense_kept']:.4f}", f"{r['mean_abs_dense_pruned']:.4f}",
        f"{r['val_loss']:.4f}") for r in records],
      ("epoch", "sparsity", "regrown / kept", "|dense| kept", "|dense| pruned", "val loss")))
  path = _common.pathlib.Path(args.out)
  _common.write_json(path, records, learning_rate=lr, epochs=args.epochs)
  print(f"\nwrote {path}")
  return {"records": records}


if __name__ == "__main__":
  main()
