"""Sensitivity analysis: per-layer sparsities for a budget against uniform ones.

Run as ``python -m benchmarks.sensitivity`` (digits and MNIST-1D, 3 seeds, the
tasks' full epochs of dense training: about 4.5 minutes on 2 shared CPU cores) or with
``--quick`` (1 seed, the tasks' short epochs). For every task and seed it

1. trains the model of ``benchmarks.accuracy`` dense (``optax.adam`` alone, the
   same train step, batches and learning rate) on the training split less a
   held-out validation split;
2. runs ``optax_prune.sensitivity(params, criterion, SPARSITIES, where=...)``,
   where ``criterion`` is a loss on the validation split (lower is better:
   cross-entropy by default, ``--criterion error`` for ``-accuracy``);
3. at each total budget (0.5, 0.7, 0.8, 0.9 of the analysed kernels' entries)
   prunes the trained params once, WITHOUT fine-tuning, with

   * ``uniform``: ``prune(params, s, where=..., distribution="uniform")``, every kernel at ``s``;
   * ``allocated``: ``prune(params, sparsities_for_budget(report, s,
     params=params), where=...)``, the least total loss rule (default);
   * ``equal-loss``: the same with ``rule="equal_loss"`` (PaddleSlim's);
   * ``global``: ``prune(params, s, where=..., scope="global")``, one magnitude
     ranking of all kernels, a reference that needs no analysis;

   and reports the task's metric on its test split (never seen by the
   analysis) and the measured sparsity of the analysed leaves, read from the
   masks.

Held-out splits: digits and MNIST-1D hold out a stratified 20% of their
training split for the criterion (the test split stays for the metric); chars
has one held-out text (the last stdlib files), whose first half scores the
criterion and second half the reported validation loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from sklearn import model_selection

import optax_prune
from benchmarks import _common
from benchmarks import accuracy

TASKS = ("digits", "mnist1d", "chars")
DEFAULT_TASKS = ("digits", "mnist1d")
BUDGETS = (0.5, 0.7, 0.8, 0.9)
# Past the largest budget, so that at 0.9 the allocation can still prune an
# insensitive kernel harder than the rest (`sparsities_for_budget` accepts
# targets up to the largest measured sparsity).
SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
METHODS = ("uniform", "allocated", "equal-loss", "global")
VALIDATION_FRACTION = 0.2
SPLIT_SEED = 0  # Fixed: every seed is analysed and scored on the same splits.
LOADERS = {"digits": accuracy.load_digits, "mnist1d": accuracy.load_mnist1d}


@dataclasses.dataclass(frozen=True)
class Setup:
  """A task trained on its fit split, and its criterion on held-out data."""

  task: accuracy.Task  # `task.evaluate`: the reported metric (test split).
  criterion: Callable[[Any], float]  # params -> loss on validation, lower better.
  criterion_name: str
  held_out: str  # Which data the criterion reads, in words.


def _cross_entropy(model, x, y):
  @jax.jit
  def loss(params):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


def _classification_setup(name: str, criterion: str) -> Setup:
  base = accuracy.make_task(name)
  x_train, x_test, y_train, y_test = LOADERS[name]()
  x_fit, x_val, y_fit, y_val = model_selection.train_test_split(
      x_train, y_train, test_size=VALIDATION_FRACTION,
      random_state=SPLIT_SEED, stratify=y_train)
  # The task of `benchmarks.accuracy` (model, learning rate, batch size,
  # epochs), trained on the fit split and scored on the unchanged test split.
  task = accuracy._classification_task(  # pylint: disable=protected-access
      name, base.model, (x_fit, x_test, y_fit, y_test),
      learning_rate=base.learning_rate, batch_size=base.batch_size,
      epochs=base.epochs, quick_epochs=base.quick_epochs)
  if criterion == "loss":
    loss = _cross_entropy(base.model, x_val, y_val)
    fn, label = lambda params: float(loss(params)), "validation cross-entropy"
  else:
    @jax.jit
    def error(params):
      logits = base.model.apply({"params": params}, x_val)
      return -jnp.mean(jnp.argmax(logits, -1) == y_val)
    fn, label = lambda params: float(error(params)), "-validation accuracy"
  held_out = (f"{len(x_val)} of the {len(x_train)} training examples"
              f" (stratified, seed {SPLIT_SEED}); trained on {len(x_fit)}")
  return Setup(task, fn, label, held_out)


def _chars_setup() -> Setup:
  base = accuracy.make_task("chars")
  _, validation = accuracy.load_chars()
  context = base.model.context
  half = len(validation) // 2

  def windows(text):
    starts = np.linspace(0, len(text) - context - 2, 256).astype(np.int64)
    chunk = text[starts[:, None] + np.arange(context + 1)].astype(np.int32)
    return chunk[:, :-1], chunk[:, 1:]

  criterion = _cross_entropy(base.model, *windows(validation[:half]))
  metric = _cross_entropy(base.model, *windows(validation[half:]))
  task = dataclasses.replace(base, evaluate=lambda params: float(metric(params)))
  held_out = ("256 windows of the first half of the validation text; the"
              " reported val_loss: 256 of the second half")
  return Setup(task, lambda params: float(criterion(params)),
               "validation cross-entropy (first half)", held_out)


def make_setup(name: str, criterion: str = "loss") -> Setup:
  if name == "chars":
    return _chars_setup()
  return _classification_setup(name, criterion)


# --------------------------------------------------------------- training --


def train(task: accuracy.Task, seed: int, epochs: int, tx, train_step):
  """The ``TrainState`` after ``epochs`` of ``tx`` from seed ``seed``'s
  initialisation and batches."""
  params = jax.jit(task.model.init)(jax.random.key(seed), task.example())["params"]
  # `TrainState.create` with `tx.init` compiled once: eager, the initial masks
  # of rigl, static_sparse and the others compiled op by op (seconds each).
  state = train_state.TrainState(step=0, apply_fn=task.model.apply, params=params, tx=tx,
                                 opt_state=jax.jit(tx.init)(params))
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    for x, y in zip(*task.epoch_batches(rng)):
      state = train_step(state, x, y)
  return jax.block_until_ready(state)


def prune_with(method: str, params, budget: float, report, where):
  """(pruned params, masks) of one method at a total budget."""
  if method == "uniform":
    return optax_prune.prune(params, budget, where=where, distribution="uniform")
  if method == "global":
    return optax_prune.prune(params, budget, where=where, scope="global")
  rule = "equal_loss" if method == "equal-loss" else "least_loss"
  targets = optax_prune.sparsities_for_budget(report, budget, params=params, rule=rule)
  return optax_prune.prune(params, targets, where=where)


def run_seed(setup: Setup, seed: int, epochs: int, budgets: Sequence[float],
             sparsities: Sequence[float], methods: Sequence[str], tx,
             train_step) -> tuple[dict, list, Any]:
  """Trains, analyses and prunes one seed: (analysis, records, report)."""
  task = setup.task
  start = time.perf_counter()
  params = train(task, seed, epochs, tx, train_step).params
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  report = optax_prune.sensitivity(params, setup.criterion, sparsities,
                                   where=task.where)
  analysis_s = time.perf_counter() - start
  dense = task.evaluate(params)
  analysis = {
      "task": task.name, "seed": seed, "metric": task.metric, "dense": dense,
      "baseline_criterion": report.baseline,
      "sparsities": list(report.sparsities),
      "losses": {p: list(v) for p, v in report.losses.items()},
      "sizes": report.sizes,
      "allocations": {f"{b:g}": optax_prune.sparsities_for_budget(report, b)
                      for b in budgets},
      "train_s": train_s, "analysis_s": analysis_s,
  }
  records = []
  for budget in budgets:
    for method in methods:
      pruned, masks = prune_with(method, params, budget, report, task.where)
      summary = optax_prune.sparsity_summary(pruned, masks)
      records.append({
          "task": task.name, "seed": seed, "budget": budget, "method": method,
          "metric": task.metric, "value": task.evaluate(pruned),
          "dense": dense, "criterion": setup.criterion(pruned),
          "measured_sparsity": summary.masked_sparsity,
          # Each analysed leaf's pruned fraction, from the masks.
          "per_leaf": {r.path: r.pruned / r.size for r in summary.rows
                       if r.pruned is not None},
      })
  return analysis, records, report


# --------------------------------------------------------------- reporting --


def _gain(record, uniform) -> float:
  """How much better than uniform (points of accuracy, or nats of loss)."""
  if record["metric"] == "test_accuracy":
    return 100 * (record["value"] - uniform["value"])
  return uniform["value"] - record["value"]


def _spread(values) -> str:
  values = np.asarray(values, float)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return f"{values.mean():+.2f} ± {std:.2f}"


def table(records: Sequence[dict]) -> str:
  """Mean ± sample std over seeds of each (task, budget, method)."""
  uniform = {(r["task"], r["seed"], r["budget"]): r for r in records
             if r["method"] == "uniform"}
  groups: dict[tuple, list] = {}
  for r in records:
    groups.setdefault((r["task"], r["budget"], r["method"]), []).append(r)
  rows = []
  for (task, budget, method), rs in groups.items():
    scale = 100 if rs[0]["metric"] == "test_accuracy" else 1
    values = scale * np.array([r["value"] for r in rs])
    dense = scale * np.mean([r["dense"] for r in rs])
    std = float(np.std(values, ddof=1)) if len(rs) > 1 else 0.0
    measured = [r["measured_sparsity"] for r in rs]
    gains = [_gain(r, uniform[(task, r["seed"], budget)]) for r in rs]
    wins = sum(g > 0 for g in gains)
    rows.append((
        task, f"{budget:g}", method, f"{np.mean(measured):.4f}",
        f"{max(abs(m - budget) for m in measured):.1e}",
        f"{dense:.2f}" if scale == 100 else f"{dense:.4f}",
        (f"{values.mean():.2f} ± {std:.2f}" if scale == 100
         else f"{values.mean():.4f} ± {std:.4f}"),
        "-" if method == "uniform" else _spread(gains),
        "-" if method == "uniform" else f"{wins}/{len(rs)}",
    ))
  header = ("task", "budget", "method", "measured", "max |err|", "dense",
            "metric mean ± std", "vs uniform", "wins")
  return _common.table(rows, header)


def allocation_table(analysis: dict) -> str:
  """The per-leaf sparsities chosen at each budget, for one seed."""
  budgets = list(analysis["allocations"])
  rows = [(path, str(analysis["sizes"][path]),
           *(f"{analysis['allocations'][b][path]:.3f}" for b in budgets))
          for path in analysis["sizes"]]
  return _common.table(rows, ("leaf", "size", *(f"at {b}" for b in budgets)))


def plot(analyses: Sequence[dict], reports: dict, records: Sequence[dict],
         path: pathlib.Path) -> None:
  """Per task: the first seed's sensitivity curves; metric against budget."""
  import matplotlib

  matplotlib.use("Agg")  # Files only: no display on CI machines.
  import matplotlib.pyplot as plt

  tasks = list(dict.fromkeys(r["task"] for r in records))
  fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
  for (left, right), task in zip(axes, tasks):
    first = next(a for a in analyses if a["task"] == task)
    reports[(task, first["seed"])].plot(left)
    left.set_title(f"{task}, seed {first['seed']}: one leaf pruned, others dense")
    left.set_ylabel(f"increase of the criterion (baseline {first['baseline_criterion']:.4g})")
    left.grid(alpha=0.3)
    mine = [r for r in records if r["task"] == task]
    scale = 100 if mine[0]["metric"] == "test_accuracy" else 1
    budgets = sorted({r["budget"] for r in mine})
    styles = {"uniform": "o-", "allocated": "s-", "equal-loss": "d--", "global": "^:"}
    for i, method in enumerate(m for m in METHODS if any(r["method"] == m for r in mine)):
      style = styles[method]
      values = [[scale * r["value"] for r in mine
                 if r["method"] == method and r["budget"] == b] for b in budgets]
      mean = [np.mean(v) for v in values]
      std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
      right.errorbar(np.array(budgets) + 0.004 * (i - 1.5), mean, yerr=std,
                     fmt=style, capsize=3, ms=4, label=method)
    dense = scale * np.mean([a["dense"] for a in analyses if a["task"] == task])
    right.axhline(dense, color="0.5", ls="--", lw=1, label="dense")
    seeds = len({r["seed"] for r in mine})
    right.set(title=f"{task}: one-shot, no fine-tuning ({seeds} seeds)",
              xlabel="total sparsity of the analysed kernels",
              ylabel="test accuracy (%)" if scale == 100
              else "validation loss (nats/char)")
    right.grid(alpha=0.3)
    right.legend(fontsize="small")
  _common.save_figure(fig, path)


# -------------------------------------------------------------------- main --


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
  return tuple(x for x in text.split(",") if x)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.sensitivity",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="1 seed and the tasks' short epochs")
  parser.add_argument("--tasks", type=_names, default=DEFAULT_TASKS,
                      help=f"comma-separated, from {','.join(TASKS)}"
                      f" (default: {','.join(DEFAULT_TASKS)})")
  parser.add_argument("--seeds", type=int, help="number of seeds (default 3, 1 with --quick)")
  parser.add_argument("--epochs", type=int,
                      help="epochs of dense training (default: per task)")
  parser.add_argument("--budgets", type=_floats, default=BUDGETS,
                      help="comma-separated total sparsities")
  parser.add_argument("--sparsities", type=_floats, default=SPARSITIES,
                      help="comma-separated, increasing: the sensitivity sweep")
  parser.add_argument("--methods", type=_names, default=METHODS,
                      help=f"comma-separated, from {','.join(METHODS)} (uniform is"
                      " the reference of the 'vs uniform' column)")
  parser.add_argument("--criterion", choices=("loss", "error"), default="loss",
                      help="what the analysis minimises on the validation split of"
                      " digits and MNIST-1D: cross-entropy or -accuracy")
  parser.add_argument("--out", type=pathlib.Path,
                      default=accuracy.RESULTS / "sensitivity.json")
  parser.add_argument("--plot", type=pathlib.Path,
                      help="PNG path (default: beside --out, <stem>.png)")
  args = parser.parse_args(argv)
  if bad := [t for t in args.tasks if t not in TASKS]:
    parser.error(f"--tasks: unknown {bad}; expected from {TASKS}.")
  if "uniform" not in args.methods or set(args.methods) - set(METHODS):
    parser.error(f"--methods: expected uniform and others from {METHODS};"
                 f" got {args.methods}.")
  args.seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
  if args.seeds < 1:
    parser.error(f"--seeds must be >= 1; got {args.seeds}.")
  if args.epochs is not None and args.epochs < 1:
    parser.error(f"--epochs must be >= 1; got {args.epochs}.")
  if list(args.sparsities) != sorted(args.sparsities) or not args.sparsities:
    parser.error(f"--sparsities must be increasing; got {args.sparsities}.")
  if bad := [b for b in args.budgets if not 0.0 <= b <= args.sparsities[-1]]:
    parser.error(f"--budgets must be in [0, {args.sparsities[-1]}] (the largest of"
                 f" --sparsities); got {bad}.")
  args.plot = args.plot or args.out.with_suffix(".png")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the benchmark; returns what it saves: header, analyses, records."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  start = time.perf_counter()
  analyses, records, reports, held_out, epochs_of = [], [], {}, {}, {}
  for name in args.tasks:
    setup = make_setup(name, args.criterion)
    task = setup.task
    epochs = args.epochs or (task.quick_epochs if args.quick else task.epochs)
    epochs_of[name] = epochs
    held_out[name] = {"criterion": setup.criterion_name, "data": setup.held_out}
    print(f"{name}: {epochs} epochs dense; criterion {setup.criterion_name} on"
          f" {setup.held_out}; metric {task.metric} on data the analysis never reads")
    # One optimizer and one train step per task: their trace is reused by every seed.
    tx, train_step = optax.adam(task.learning_rate), accuracy.make_train_step(task)
    for seed in range(args.seeds):
      analysis, rs, report = run_seed(setup, seed, epochs, args.budgets,
                                      args.sparsities, args.methods, tx,
                                      train_step)
      analyses.append(analysis)
      records += rs
      reports[(name, seed)] = report
      print(f"  seed {seed}: trained in {analysis['train_s']:.1f} s, analysed in"
            f" {analysis['analysis_s']:.1f} s, dense {task.metric} {analysis['dense']:.4f}")
      if seed == 0:
        print(report)
        print("per-leaf sparsities chosen for each budget (seed 0):")
        print(allocation_table(analysis))
  total = time.perf_counter() - start
  header = {"command": " ".join(["python -m benchmarks.sensitivity", *argv]),
            "tasks": list(args.tasks), "seeds": args.seeds, "epochs": epochs_of,
            "budgets": list(args.budgets), "sparsities": list(args.sparsities),
            "methods": list(args.methods), "held_out": held_out,
            "std": "sample standard deviation over seeds (ddof=1)",
            "fine_tuning": "none: one-shot pruning of the dense params",
            "total_wall_s": total, "analyses": analyses}
  _common.write_json(args.out, records, **header)
  print()
  print("one-shot pruning without fine-tuning; metric on the test split (digits,"
        " MNIST-1D: accuracy %) or the second half of validation (chars: loss);"
        " 'vs uniform': better by (pts, or nats), mean ± std over seeds;"
        " 'measured': pruned fraction of the analysed kernels, from the masks")
  print(table(records))
  plot(analyses, reports, records, args.plot)
  print(f"\nwrote {args.out} and {args.plot} ({total:.0f} s)")
  return {"header": header, "records": records}


if __name__ == "__main__":
  main()
