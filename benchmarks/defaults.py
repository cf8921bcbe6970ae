"""Which per-layer sparsities a default should give: gradual runs compared.

Run as ``python -m benchmarks.defaults`` (digits, MNIST-1D and the character
transformer, sparsities 0.9 and 0.95, 3 seeds, the tasks' full epochs: about
25 minutes on 2 CPU cores) or with ``--quick`` (1 seed, short epochs). For
every task and seed it

1. trains the model of ``benchmarks.accuracy`` dense (``optax.adam`` alone) on
   the fit split of ``benchmarks.sensitivity`` and runs
   ``optax_prune.sensitivity`` on it (criterion on held-out data);
2. trains the same model from the same initialisation with
   ``optax.chain(optax.adam(lr), magnitude_pruning(...))``, a cubic schedule
   (``polynomial_schedule(s, 0, E * steps, frequency=steps)``, ``E`` two
   thirds of the epochs, as in ``benchmarks.accuracy``), once per allocation:

   * ``uniform``: ``magnitude_pruning(schedule, where=...)`` with
     ``distribution="uniform"``: every kernel at ``s`` (the default before
     this benchmark);
   * ``global``: ``scope="global"``, one magnitude ranking of all kernels;
   * ``erk``: ``distribution="erk"``, Erdos-Renyi-Kernel shares of ``s``;
   * ``sensitivity``: per-kernel targets from ``sparsities_for_budget(report,
     s, params=dense_params)``, each on its own cubic schedule;

   and reports the task's metric on its test split (chars: validation loss),
   the measured sparsity and the largest per-kernel sparsity, read from the
   masks: a kernel pruned to 1.0 is a collapsed layer.

Every allocation prunes the same total, ``round(s * N)`` of the kernels'
``N`` entries (uniform to per-leaf rounding), over the same steps.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
import optax
from tqdm import tqdm

import optax_prune
from benchmarks import _common
from benchmarks import accuracy
from benchmarks import sensitivity

TASKS = ("digits", "mnist1d", "chars")
SPARSITIES = (0.9, 0.95)
ALLOCATIONS = ("uniform", "global", "erk", "sensitivity")
# The sensitivity sweep (`optax_prune.sensitivity`'s default): targets up to
# its largest sparsity can be allocated.
SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


def cubic(sparsity: float, end_step: int, steps: int):
  return optax_prune.polynomial_schedule(
      sparsity, begin_step=0, end_step=end_step, frequency=steps)


def pruning(allocation: str, sparsity: float, end_step: int, steps: int,
            where, targets=None) -> optax.GradientTransformation:
  """The pruning link of one allocation; ``targets``: per-leaf sparsities."""
  if allocation == "sensitivity":
    schedule = jax.tree.map(lambda t: cubic(t, end_step, steps), targets)
    return optax_prune.magnitude_pruning(schedule, where=where,
                                         distribution="uniform")
  options = {"uniform": dict(distribution="uniform"),
             "global": dict(scope="global", distribution="uniform"),
             "erk": dict(distribution="erk")}[allocation]
  return optax_prune.magnitude_pruning(cubic(sparsity, end_step, steps),
                                       where=where, **options)


def record(task, seed, allocation, sparsity, state, dense) -> dict[str, Any]:
  summary = optax_prune.sparsity_summary(state.params, state.opt_state)
  per_leaf = {r.path: r.pruned / r.size for r in summary.rows if r.pruned is not None}
  return {
      "task": task.name, "seed": seed, "allocation": allocation,
      "sparsity": sparsity, "metric": task.metric,
      "value": task.evaluate(state.params), "dense": dense,
      "measured_sparsity": summary.masked_sparsity,
      "max_leaf_sparsity": max(per_leaf.values()),
      "collapsed_leaves": sum(s == 1.0 for s in per_leaf.values()),
      "per_leaf": per_leaf,
  }


# --------------------------------------------------------------- reporting --


def table(records: Sequence[dict]) -> str:
  """Mean ± sample std over seeds of each (task, sparsity, allocation)."""
  groups: dict[tuple, list] = {}
  for r in records:
    groups.setdefault((r["task"], r["sparsity"], r["allocation"]), []).append(r)
  rows = []
  for (task, sparsity, allocation), rs in groups.items():
    scale = 100 if rs[0]["metric"] == "test_accuracy" else 1
    values = scale * np.array([r["value"] for r in rs])
    std = float(np.std(values, ddof=1)) if len(rs) > 1 else 0.0
    dense = scale * np.mean([r["dense"] for r in rs])
    digits = 2 if scale == 100 else 4
    rows.append((
        task, f"{sparsity:g}", allocation,
        f"{np.mean([r['measured_sparsity'] for r in rs]):.4f}",
        f"{max(r['max_leaf_sparsity'] for r in rs):.4f}",
        str(sum(r["collapsed_leaves"] for r in rs)),
        f"{dense:.{digits}f}", f"{values.mean():.{digits}f} ± {std:.{digits}f}",
    ))
  header = ("task", "sparsity", "allocation", "measured", "max leaf",
            "collapsed", "dense", "metric mean ± std")
  return _common.table(rows, header)


def plot(records: Sequence[dict], path: pathlib.Path) -> None:
  """Per task: the metric of each allocation at each sparsity, seeds as bars."""
  import matplotlib

  matplotlib.use("Agg")  # Files only: no display on CI machines.
  import matplotlib.pyplot as plt

  tasks = list(dict.fromkeys(r["task"] for r in records))
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    mine = [r for r in records if r["task"] == task]
    scale = 100 if mine[0]["metric"] == "test_accuracy" else 1
    sparsities = sorted({r["sparsity"] for r in mine})
    allocations = [a for a in ALLOCATIONS if any(r["allocation"] == a for r in mine)]
    width = 0.8 / len(allocations)
    for i, allocation in enumerate(allocations):
      values = [[scale * r["value"] for r in mine
                 if r["allocation"] == allocation and r["sparsity"] == s] for s in sparsities]
      ax.bar(np.arange(len(sparsities)) + (i - (len(allocations) - 1) / 2) * width,
             [np.mean(v) for v in values], width,
             yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values],
             capsize=2, label=allocation)
    ax.axhline(scale * np.mean([r["dense"] for r in mine]), color="0.3", ls="--",
               lw=1, label="dense")
    low = min(scale * r["value"] for r in mine)
    high = max(scale * max(r["value"], r["dense"]) for r in mine)
    ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
    ax.set_xticks(range(len(sparsities)), [f"{s:g}" for s in sparsities])
    ax.set(title=f"{task}: cubic gradual pruning", xlabel="sparsity of the kernels",
           ylabel="test accuracy (%)" if scale == 100 else "validation loss (nats/char)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
  _common.save_figure(fig, path)


# -------------------------------------------------------------------- main --


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.defaults",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="1 seed and the tasks' short epochs")
  parser.add_argument("--tasks", type=sensitivity._names, default=TASKS,  # pylint: disable=protected-access
                      help=f"comma-separated, from {','.join(TASKS)}")
  parser.add_argument("--seeds", type=int, help="number of seeds (default 3, 1 with --quick)")
  parser.add_argument("--epochs", type=int, help="epochs of every task (default: per task)")
  parser.add_argument("--sparsities", type=sensitivity._floats, default=SPARSITIES,  # pylint: disable=protected-access
                      help="comma-separated final sparsities, at most 0.98")
  parser.add_argument("--allocations", type=sensitivity._names, default=ALLOCATIONS,  # pylint: disable=protected-access
                      help=f"comma-separated, from {','.join(ALLOCATIONS)}")
  parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "defaults.json")
  parser.add_argument("--plot", type=pathlib.Path, help="PNG path (default: beside --out)")
  args = parser.parse_args(argv)
  args.seeds = args.seeds or (1 if args.quick else 3)
  if bad := [t for t in args.tasks if t not in TASKS]:
    parser.error(f"--tasks: unknown {bad}; expected from {TASKS}.")
  if bad := [a for a in args.allocations if a not in ALLOCATIONS]:
    parser.error(f"--allocations: unknown {bad}; expected from {ALLOCATIONS}.")
  top = SWEEP[-1]
  if bad := [s for s in args.sparsities if not 0.0 < s <= top]:
    parser.error(f"--sparsities must be in (0, {top}] (the sensitivity sweep's"
                 f" largest); got {bad}.")
  if args.epochs is not None and args.epochs < 2:
    parser.error(f"--epochs must be >= 2 (a ramp, then fine-tuning); got {args.epochs}.")
  args.plot = args.plot or args.out.with_suffix(".png")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the benchmark; returns what it saves: header and records."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  start = time.perf_counter()
  records, epochs_of = [], {}
  runs = len(args.tasks) * args.seeds * (1 + len(args.sparsities) * len(args.allocations))
  with tqdm(total=runs, unit="run") as bar:
    for name in args.tasks:
      setup = sensitivity.make_setup(name)
      task, steps = setup.task, setup.task.steps_per_epoch
      epochs = args.epochs or (task.quick_epochs if args.quick else task.epochs)
      epochs_of[name] = epochs
      end_step = min(max(1, round(epochs * accuracy.END_FRACTION)), epochs - 1) * steps
      adam, train_step = optax.adam(task.learning_rate), accuracy.make_train_step(task)
      # One transformation per configuration, shared by the seeds: the train
      # step is compiled once for each (the transformation is static in it).
      shared = {(a, s): optax.chain(adam, pruning(a, s, end_step, steps, task.where))
                for a in args.allocations if a != "sensitivity" for s in args.sparsities}
      for seed in range(args.seeds):
        bar.set_description(f"{name} seed {seed} dense")
        params = sensitivity.train(task, seed, epochs, adam, train_step).params
        dense = task.evaluate(params)
        if "sensitivity" in args.allocations:
          report = optax_prune.sensitivity(params, setup.criterion, SWEEP, where=task.where)
        bar.update()
        for sparsity in args.sparsities:
          for allocation in args.allocations:
            bar.set_description(f"{name} seed {seed} {allocation} {sparsity:g}")
            if allocation == "sensitivity":
              targets = optax_prune.sparsities_for_budget(report, sparsity, params=params)
              tx = optax.chain(adam, pruning(allocation, sparsity, end_step, steps,
                                             task.where, targets))
            else:
              tx = shared[allocation, sparsity]
            state = sensitivity.train(task, seed, epochs, tx, train_step)
            records.append(record(task, seed, allocation, sparsity, state, dense))
            bar.update()
  total = time.perf_counter() - start
  header = {"command": " ".join(["python -m benchmarks.defaults", *argv]),
            "tasks": list(args.tasks), "seeds": args.seeds, "epochs": epochs_of,
            "sparsities": list(args.sparsities), "allocations": list(args.allocations),
            "schedule": "cubic, every epoch, reaching the target at 2/3 of the epochs",
            "std": "sample standard deviation over seeds (ddof=1)",
            "total_wall_s": total}
  _common.write_json(args.out, records, **header)
  print()
  print("gradual cubic pruning of the kernels; metric on the test split (digits,"
        " MNIST-1D: accuracy %) or validation (chars: loss), mean ± std over seeds;"
        " 'max leaf': the most pruned kernel's sparsity; 'collapsed': kernels"
        " pruned whole, summed over seeds")
  print(table(records))
  plot(records, args.plot)
  print(f"\nwrote {args.out} and {args.plot} ({total:.0f} s)")
  return {"header": header, "records": records}


if __name__ == "__main__":
  main()
