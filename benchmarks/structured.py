"""Accuracy of structured sparsity: 2:4 and 4x4 blocks beside unstructured.

Run as ``python -m benchmarks.structured`` (1 seed, few epochs) or with
``--full`` (3 seeds, the tasks' full epochs: 48 runs, about 8 minutes on 2
CPU cores). On the digits CNN and the MNIST-1D CNN of
``benchmarks.accuracy`` (same training, cubic schedule, ``scope="global"``),
it trains every kernel with

* ``unstructured``: single weights, at entry sparsities 0.5, 0.75, 0.9;
* ``blocks4x4``: ``blocks((4, 4))`` of the last two axes scored by mean
  ``|w|``, at block sparsities 0.5, 0.75, 0.9;
* ``2:4``: ``n_of_m(2, 4)`` along the input axis of each kernel (the output
  axis where the input has fewer than 4), ramped to every group 2:4, that
  is 50% of the entries;

beside the dense run, and reports the test accuracy (mean and std over
seeds) against the measured entry sparsity, as a table, JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import jax
from tqdm import tqdm

import optax_prune
from benchmarks import _common
from benchmarks import accuracy

TASKS = ("digits", "mnist1d")
UNIT_SPARSITIES = (0.5, 0.75, 0.9)


def two_of_four(params) -> Any:
  """2:4 along each kernel's input axis (-2), or its output axis (-1)."""
  def granularity(leaf):
    if leaf.ndim < 2:
      return None  # A bias: not pruned (the default `where`).
    axis = -2 if leaf.shape[-2] % 4 == 0 else -1
    return optax_prune.n_of_m(2, 4, axis=axis)
  return jax.tree.map(granularity, params)


GRANULARITIES = {
    "unstructured": (lambda params: None, UNIT_SPARSITIES),
    "blocks4x4": (lambda params: optax_prune.blocks((4, 4)), UNIT_SPARSITIES),
    "2:4": (two_of_four, (1.0,)),  # Every group 2:4: half the entries.
}


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.structured",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--full", action="store_true",
                      help="3 seeds and the tasks' full epochs")
  parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
  parser.add_argument("--granularities", nargs="+", default=list(GRANULARITIES),
                      choices=list(GRANULARITIES))
  parser.add_argument("--unit-sparsities", type=float, nargs="+",
                      default=list(UNIT_SPARSITIES),
                      help="schedule targets of unstructured and blocks4x4 runs")
  parser.add_argument("--seeds", type=int)
  parser.add_argument("--epochs", type=int, help="epochs of every task")
  parser.add_argument("--out", type=pathlib.Path)
  parser.add_argument("--plot", type=pathlib.Path)
  args = parser.parse_args(argv)
  args.seeds = args.seeds or (3 if args.full else 1)
  name = "structured" if args.full else "structured_quick"
  args.out = args.out or accuracy.RESULTS / f"{name}.json"
  args.plot = args.plot or args.out.with_suffix(".png")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  configs = [(task, "dense", 0.0) for task in args.tasks]
  configs += [(task, g, s) for task in args.tasks for g in args.granularities
              for s in (GRANULARITIES[g][1] if g == "2:4" else args.unit_sparsities)]
  records, tasks = [], {}
  start = time.perf_counter()
  with tqdm(total=len(configs) * args.seeds, unit="run") as bar:
    for task_name, granularity, sparsity in configs:
      task = tasks.setdefault(task_name, accuracy.make_task(task_name))
      epochs = args.epochs or (task.epochs if args.full else task.quick_epochs)
      schedule = accuracy.DENSE if granularity == "dense" else "cubic"
      make = GRANULARITIES.get(granularity, (lambda params: None,))[0]
      record = accuracy.run_config(task, schedule, sparsity, args.seeds, epochs,
                                   "global", bar, granularity=make)
      record["granularity"] = granularity
      records.append(record)
  header = accuracy.machine_info(argv)
  header["total_wall_s"] = time.perf_counter() - start
  result = {"header": header, "records": records}
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=1) + "\n")
  print()
  print(table(records))
  plot(records, args.plot)
  print(f"\nwrote {args.out} and {args.plot} ({header['total_wall_s']:.0f} s)")
  return result


def table(records) -> str:
  rows = []
  for r in records:
    dense = next(d for d in records if d["task"] == r["task"] and d["granularity"] == "dense")
    rows.append((
        r["task"], r["granularity"], f"{r['sparsity']:g}",
        f"{r['measured_sparsity']:.3f}",
        f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}",
        f"{100 * (r['mean'] - dense['mean']):+.2f}", len(r["seeds"])))
  header = ("task", "granularity", "unit sparsity", "entry sparsity",
            "test accuracy %", "vs dense (pts)", "seeds")
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  fmt = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
  return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def plot(records, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = sorted({r["task"] for r in records}, key=TASKS.index)
  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    dense = next(r for r in records if r["task"] == task and r["granularity"] == "dense")
    for name, marker in [("unstructured", "o"), ("blocks4x4", "s"), ("2:4", "D")]:
      rs = [dense] + [r for r in records if r["task"] == task and r["granularity"] == name]
      if len(rs) == 1:
        continue
      x = [r["measured_sparsity"] for r in rs]
      y = [100 * r["mean"] for r in rs]
      err = [100 * r["std"] for r in rs]
      ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=name)
    ax.set(title=task, xlabel="entry sparsity (from the masks)",
           ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
  _common.save_figure(fig, path)


if __name__ == "__main__":
  main()
