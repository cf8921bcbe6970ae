"""Sparse training beside gradual pruning, at the same training budget.

Run as ``python -m benchmarks.sparse_training`` (MNIST-1D and the character
transformer, sparsities 0.8 and 0.9 with ERK shares, 3 seeds, the tasks'
full epochs: 66 runs) or with ``--quick`` (1 seed, short epochs). For every
task and seed, from the same initialisation and batches, the model of
``benchmarks.accuracy`` is trained with ``optax.adam`` and, per method:

* ``dense``: adam alone (once per seed);
* ``gradual``: ``chain(adam, magnitude_pruning(cubic, distribution="erk"))``,
  the cubic schedule reaching ``s`` at 2/3 of the epochs, updated every epoch
  (as ``benchmarks.defaults``);
* ``static``: ``chain(adam, static_sparse(s, seed=seed))``;
* ``set`` / ``rigl``: ``set_training`` / ``rigl(adam, s, end_step=3/4 of the
  steps, frequency=one epoch, seed=seed)``, drop fraction 0.3 decayed by a
  cosine (RigL's defaults but for the update interval);
* ``ste``: ``chain(adam, straight_through(cubic, distribution="erk"))``.

Every sparse method prunes ``round(s * N)`` of the kernels' ``N`` entries
(ERK shares) and trains the same number of steps. Reports the test accuracy
(MNIST-1D) or validation loss (chars), mean and sample std over seeds, the
measured sparsity, and the wall time of a run.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
import optax
from tqdm import tqdm

import optax_prune
from benchmarks import _common
from benchmarks import accuracy
from benchmarks import sensitivity

TASKS = ("mnist1d", "chars")
SPARSITIES = (0.8, 0.9)
METHODS = ("gradual", "static", "set", "rigl", "ste")
DENSE = "dense"


def make_tx(method: str, task: accuracy.Task, sparsity: float, seed: int,
            epochs: int) -> optax.GradientTransformation:
  """The optimizer of one method for ``epochs`` of ``task``."""
  adam, steps = optax.adam(task.learning_rate), task.steps_per_epoch
  if method == DENSE:
    return adam
  cubic = optax_prune.polynomial_schedule(
      sparsity, begin_step=0, frequency=steps,
      end_step=min(max(1, round(epochs * accuracy.END_FRACTION)), epochs - 1) * steps)
  if method == "gradual":
    return optax.chain(adam, optax_prune.magnitude_pruning(
        cubic, where=task.where, distribution="erk"))
  if method == "ste":
    return optax.chain(adam, optax_prune.straight_through(
        cubic, where=task.where, distribution="erk"))
  if method == "static":
    return optax.chain(adam, optax_prune.static_sparse(sparsity, where=task.where, seed=seed))
  dynamic = {"set": optax_prune.set_training, "rigl": optax_prune.rigl}[method]
  return dynamic(adam, sparsity, end_step=round(0.75 * epochs * steps), frequency=steps,
                 where=task.where, seed=seed)


def record(task, seed, method, sparsity, state, wall_s) -> dict[str, Any]:
  measured = 0.0
  if method != DENSE:
    measured = optax_prune.sparsity_summary(state.params, state.opt_state).masked_sparsity
  return {"task": task.name, "seed": seed, "method": method, "sparsity": sparsity,
          "metric": task.metric, "value": task.evaluate(state.params),
          "measured_sparsity": measured, "wall_s": wall_s}


def table(records: Sequence[dict]) -> str:
  """Mean ± sample std over seeds of each (task, sparsity, method)."""
  groups: dict[tuple, list] = {}
  for r in records:
    groups.setdefault((r["task"], r["sparsity"], r["method"]), []).append(r)
  rows = []
  for (task, sparsity, method), rs in sorted(groups.items(), key=lambda kv: (
      kv[0][0], kv[0][1], ([DENSE] + list(METHODS)).index(kv[0][2]))):
    scale = 100 if rs[0]["metric"] == "test_accuracy" else 1
    values = scale * np.array([r["value"] for r in rs])
    std = float(np.std(values, ddof=1)) if len(rs) > 1 else 0.0
    digits = 2 if scale == 100 else 4
    rows.append((task, f"{sparsity:g}", method,
                 f"{np.mean([r['measured_sparsity'] for r in rs]):.4f}",
                 f"{values.mean():.{digits}f} ± {std:.{digits}f}",
                 f"{np.mean([r['wall_s'] for r in rs]):.1f}"))
  return _common.table(rows, ("task", "sparsity", "method", "measured",
                              "metric mean ± std", "wall s/run"))


def plot(records: Sequence[dict], path: pathlib.Path) -> None:
  """Per task: each method's metric at each sparsity, seeds as error bars."""
  import matplotlib

  matplotlib.use("Agg")  # Files only: no display on CI machines.
  import matplotlib.pyplot as plt

  tasks = list(dict.fromkeys(r["task"] for r in records))
  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    mine = [r for r in records if r["task"] == task]
    scale = 100 if mine[0]["metric"] == "test_accuracy" else 1
    sparsities = sorted({r["sparsity"] for r in mine if r["method"] != DENSE})
    methods = [m for m in METHODS if any(r["method"] == m for r in mine)]
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
      values = [[scale * r["value"] for r in mine
                 if r["method"] == method and r["sparsity"] == s] for s in sparsities]
      ax.bar(np.arange(len(sparsities)) + (i - (len(methods) - 1) / 2) * width,
             [np.mean(v) for v in values], width,
             yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values],
             capsize=2, label=method)
    dense = [scale * r["value"] for r in mine if r["method"] == DENSE]
    ax.axhline(np.mean(dense), color="0.3", ls="--", lw=1, label="dense")
    values = [scale * r["value"] for r in mine]
    low, high = min(values), max(values)
    ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
    ax.set_xticks(range(len(sparsities)), [f"{s:g}" for s in sparsities])
    ax.set(title=f"{task}: sparse training vs pruning (ERK)", xlabel="sparsity of the kernels",
           ylabel="test accuracy (%)" if scale == 100 else "validation loss (nats/char)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", ncol=2)
  _common.save_figure(fig, path)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.sparse_training",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="1 seed and the tasks' short epochs")
  parser.add_argument("--tasks", type=sensitivity._names, default=TASKS,  # pylint: disable=protected-access
                      help=f"comma-separated, from {','.join(TASKS)}")
  parser.add_argument("--seeds", type=int, help="number of seeds (default 3, 1 with --quick)")
  parser.add_argument("--epochs", type=int, help="epochs of every task (default: per task)")
  parser.add_argument("--sparsities", type=sensitivity._floats, default=SPARSITIES,  # pylint: disable=protected-access
                      help="comma-separated sparsities in (0, 1)")
  parser.add_argument("--methods", type=sensitivity._names, default=METHODS,  # pylint: disable=protected-access
                      help=f"comma-separated, from {','.join(METHODS)}")
  parser.add_argument("--out", type=pathlib.Path,
                      default=_common.RESULTS / "sparse_training.json")
  parser.add_argument("--plot", type=pathlib.Path, help="PNG path (default: beside --out)")
  args = parser.parse_args(argv)
  args.seeds = args.seeds or (1 if args.quick else 3)
  if bad := [t for t in args.tasks if t not in TASKS]:
    parser.error(f"--tasks: unknown {bad}; expected from {TASKS}.")
  if bad := [m for m in args.methods if m not in METHODS]:
    parser.error(f"--methods: unknown {bad}; expected from {METHODS}.")
  if bad := [s for s in args.sparsities if not 0.0 < s < 1.0]:
    parser.error(f"--sparsities must be in (0, 1); got {bad}.")
  if args.epochs is not None and args.epochs < 2:
    parser.error(f"--epochs must be >= 2; got {args.epochs}.")
  args.plot = args.plot or args.out.with_suffix(".png")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the benchmark; returns what it saves: header and records."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  start = time.perf_counter()
  records, epochs_of = [], {}
  runs = len(args.tasks) * args.seeds * (1 + len(args.sparsities) * len(args.methods))
  with tqdm(total=runs, unit="run") as bar:
    for name in args.tasks:
      task = accuracy.make_task(name)
      epochs = args.epochs or (task.quick_epochs if args.quick else task.epochs)
      epochs_of[name] = epochs
      train_step = accuracy.make_train_step(task)
      for seed in range(args.seeds):
        for method, sparsity in [(DENSE, 0.0)] + [
            (m, s) for s in args.sparsities for m in args.methods]:
          bar.set_description(f"{name} seed {seed} {method} {sparsity:g}")
          tx = make_tx(method, task, sparsity, seed, epochs)
          began = time.perf_counter()
          state = sensitivity.train(task, seed, epochs, tx, train_step)
          records.append(record(task, seed, method, sparsity, state,
                                time.perf_counter() - began))
          bar.update()
  total = time.perf_counter() - start
  header = {"command": " ".join(["python -m benchmarks.sparse_training", *argv]),
            "tasks": list(args.tasks), "seeds": args.seeds, "epochs": epochs_of,
            "sparsities": list(args.sparsities), "methods": [DENSE, *args.methods],
            "std": "sample standard deviation over seeds (ddof=1)",
            "total_wall_s": total}
  _common.write_json(args.out, records, **header)
  print()
  print("sparse training vs gradual pruning at the same budget (ERK); metric on the"
        " test split (MNIST-1D: accuracy %) or validation (chars: loss), mean ± std"
        " over seeds; wall time of a run includes its compile")
  print(table(records))
  plot(records, args.plot)
  print(f"\nwrote {args.out} and {args.plot} ({total:.0f} s)")
  return {"header": header, "records": records}


if __name__ == "__main__":
  main()
