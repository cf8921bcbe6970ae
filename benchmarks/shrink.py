"""Channel pruning that pays off everywhere: coupled groups pruned, then shrunk.

Run as ``python -m benchmarks.shrink`` (the digits CNN, the MNIST-1D CNN and
the character transformer of ``benchmarks.accuracy``, 25/50/75% of the
prunable channels and heads removed, the tasks' full epochs, 1 seed) or with
``--quick`` (short epochs). Per task, from the same initialisation and
batches, trained with ``optax.adam``:

* ``dense``: adam alone;
* ``shrunk``: ``chain(adam, magnitude_pruning(cubic, granularity=
  coupled_channels(groups)))`` with the groups ``channel_groups`` finds
  prunable (for the transformer: heads and MLP units; flax's attention takes
  one width for query, key and value, so the value depth group is left),
  the cubic schedule reaching the fraction at 2/3 of the epochs; then
  ``shrink`` and the model rebuilt with the new widths (its outputs are
  checked against the masked model's: ``max_abs_diff``);
* ``unstructured``: ``chain(adam, magnitude_pruning(cubic))`` (ERK) with
  the sparsity that leaves as many nonzero parameters as the shrunk model
  has parameters.

Reports parameter counts, the metric (test accuracy or validation loss) and
the CPU wall time of one jitted forward pass over the evaluation set (the
minimum of ``--repeats`` passes of every model of a task, interleaved after
its training; unstructured models run dense, so their time is the dense
model's), and plots the metric against the measured speedup.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import optax_prune
from benchmarks import _common
from benchmarks import accuracy
from benchmarks import demo_digits
from benchmarks import sensitivity

TASKS = ("digits", "mnist1d", "chars")
FRACTIONS = (0.25, 0.5, 0.75)
REPEATS = 50


def evaluation(name: str) -> tuple[np.ndarray, Any]:
  """The task's evaluation inputs and ``metric(logits) -> float``."""
  if name == "chars":
    windows = accuracy.validation_windows(accuracy.CharTransformer().context)
    inputs, labels = windows[:, :-1].astype(np.int32), windows[:, 1:].astype(np.int32)
    metric = lambda logits: float(
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
    return inputs, metric
  data = accuracy.load_digits() if name == "digits" else accuracy.load_mnist1d()
  x_test, y_test = data[1], data[3]
  return x_test, lambda logits: float(jnp.mean(jnp.argmax(logits, -1) == y_test))


def rebuild(name: str, params: Any):
  """The task's model with the widths of ``params`` (shrunk or not)."""
  width = lambda *path: _leaf(params, *path, "kernel").shape
  if name == "digits":
    return demo_digits.CNN(widths=(width("Conv_0")[-1], width("Conv_1")[-1],
                                   width("Dense_0")[-1]))
  if name == "mnist1d":
    return accuracy.CNN1D(widths=tuple(width(f"Conv_{i}")[-1] for i in range(3)))
  blocks = [k for k in params if k.startswith("Block_")]
  heads = {width(b, "SelfAttention_0", "query")[1] for b in blocks}
  mlp = {width(b, "Dense_0")[-1] for b in blocks}
  if len(heads) != 1 or len(mlp) != 1:
    raise ValueError(f"blocks were shrunk unequally: heads {heads}, MLP {mlp}")
  depth = width(blocks[0], "SelfAttention_0", "query")[2]
  (heads,), (mlp,) = heads, mlp
  return accuracy.CharTransformer(heads=heads, qkv=heads * depth, mlp=mlp)


def _leaf(tree, *path):
  for key in path:
    tree = tree[key]
  return tree


def prunable_groups(task: accuracy.Task) -> tuple[Any, list]:
  """``channel_groups`` of the task's model, and the groups pruned here."""
  example = np.repeat(task.example(), 2, axis=0)  # A batch axis of 2, not 1.
  shapes = jax.eval_shape(jax.jit(task.model.init), jax.random.key(0), example)["params"]
  groups = optax_prune.channel_groups(
      lambda p, x: task.model.apply({"params": p}, x), shapes, example)
  # flax's SelfAttention has one qkv width: its value depth cannot shrink alone.
  chosen = [g for g in groups.prunable if "['value']['kernel'][axis 2]" not in g.name]
  return groups, chosen


def count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  start = time.perf_counter()
  records, analyses = [], {}
  runs = len(args.tasks) * (1 + 2 * len(args.fractions))
  with tqdm(total=runs, unit="run") as bar:
    for name in args.tasks:
      task = accuracy.make_task(name)
      epochs = args.epochs or (task.quick_epochs if args.quick else task.epochs)
      groups, chosen = prunable_groups(task)
      analyses[name] = {"groups": str(groups), "pruned": [g.name for g in chosen]}
      inputs, metric = evaluation(name)
      train_step = accuracy.make_train_step(task)
      steps = task.steps_per_epoch
      end = min(max(1, round(epochs * accuracy.END_FRACTION)), epochs - 1) * steps
      cubic = lambda s: optax_prune.polynomial_schedule(
          s, begin_step=0, end_step=end, frequency=steps)
      adam = optax.adam(task.learning_rate)

      def run(method, fraction, tx):
        bar.set_description(f"{name} {method} {fraction:g}")
        began = time.perf_counter()
        state = sensitivity.train(task, args.seed, epochs, tx, train_step)
        bar.update()
        return state.params, time.perf_counter() - began

      dense, wall = run("dense", 0.0, adam)
      dense_count = count(dense)
      apply = lambda model: jax.jit(lambda p, x: model.apply({"params": p}, x))
      dense_apply = apply(task.model)
      base = {"task": name, "metric": task.metric, "epochs": epochs,
              "dense_params": dense_count}
      records.append({**base, "method": "dense", "fraction": 0.0, "params": dense_count,
                      "value": metric(dense_apply(dense, inputs)), "wall_s": wall})
      forward = {"dense": lambda: dense_apply(dense, inputs)}  # Timed after training.
      kernels = sum(np.size(x) for path, x in jax.tree_util.tree_flatten_with_path(dense)[0]
                    if (task.where or _default_where)(path, x))
      for fraction in args.fractions:
        tx = optax.chain(adam, optax_prune.magnitude_pruning(
            cubic(fraction), granularity=optax_prune.coupled_channels(chosen)))
        masked, wall = run("shrunk", fraction, tx)
        small = optax_prune.shrink(chosen, masked)
        model = rebuild(name, small.params)
        small_apply = apply(model)
        logits = small_apply(small.params, inputs)
        diff = float(jnp.max(jnp.abs(logits - dense_apply(masked, inputs))))
        forward[fraction] = lambda f=small_apply, p=small.params: f(p, inputs)
        small_count = count(small.params)
        records.append({**base, "method": "shrunk", "fraction": fraction,
                        "params": small_count, "value": metric(logits), "wall_s": wall,
                        "max_abs_diff": diff, "sizes": small.sizes})
        sparsity = min(1.0, (dense_count - small_count) / kernels)
        tx = optax.chain(adam, optax_prune.magnitude_pruning(cubic(sparsity), where=task.where))
        pruned, wall = run("unstructured", fraction, tx)
        nonzero = int(sum(np.count_nonzero(np.asarray(x)) for x in jax.tree.leaves(pruned)))
        records.append({**base, "method": "unstructured", "fraction": fraction,
                        "params": nonzero, "kernel_sparsity": sparsity,
                        "value": metric(dense_apply(pruned, inputs)), "wall_s": wall})
      # All forward passes of the task interleaved, with no training running.
      bar.set_description(f"{name} timing")
      times = _common.time_side_by_side(forward, repeats=args.repeats, warmup=2,
                                        statistic=min)
      for r in records:
        if r["task"] == name:
          # Unstructured models have the dense shapes: the dense model's time.
          key = r["fraction"] if r["method"] == "shrunk" else "dense"
          r.update(infer_s=times[key], dense_infer_s=times["dense"],
                   speedup=times["dense"] / times[key])
  total = time.perf_counter() - start
  header = {"command": " ".join(["python -m benchmarks.shrink", *argv]),
            "tasks": list(args.tasks), "fractions": list(args.fractions),
            "seed": args.seed, "repeats": args.repeats, "analyses": analyses,
            "total_wall_s": total}
  _common.write_json(args.out, records, **header)
  print()
  print("coupled channel pruning, shrunk, vs dense and vs unstructured at the same"
        " parameter count; CPU forward pass over the evaluation set (min of"
        f" {args.repeats} interleaved repeats)")
  print(table(records))
  plot(records, args.plot)
  print(f"\nwrote {args.out} and {args.plot} ({total:.0f} s)")
  return {"header": header, "records": records}


def _default_where(path, leaf) -> bool:
  return jax.tree_util.keystr(path).endswith("['kernel']") and np.ndim(leaf) >= 2


def table(records: Sequence[dict]) -> str:
  rows = []
  for r in records:
    value = (f"{100 * r['value']:.2f}%" if r["metric"] == "test_accuracy"
             else f"{r['value']:.4f}")
    rows.append((r["task"], r["method"], f"{r['fraction']:g}",
                 f"{r['params']:,}", f"{r['params'] / r['dense_params']:.3f}", value,
                 f"{1e3 * r['infer_s']:.2f}", f"{r['speedup']:.2f}",
                 f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"))
  return _common.table(rows, ("task", "method", "removed", "params", "of dense",
                              "metric", "forward ms", "speedup", "max |diff|"))


def plot(records: Sequence[dict], path: pathlib.Path) -> None:
  """Per task: the metric against the measured speedup of the forward pass."""
  import matplotlib

  matplotlib.use("Agg")  # Files only: no display on CI machines.
  import matplotlib.pyplot as plt

  tasks = list(dict.fromkeys(r["task"] for r in records))
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    mine = [r for r in records if r["task"] == task]
    scale = 100 if mine[0]["metric"] == "test_accuracy" else 1
    for method, style in (("shrunk", "o-"), ("unstructured", "s--")):
      rs = [r for r in mine if r["method"] == method]
      ax.plot([r["speedup"] for r in rs], [scale * r["value"] for r in rs], style,
              label=f"{method} (same params)" if method == "unstructured" else method)
      for r in rs:
        ax.annotate(f"{r['fraction']:g}", (r["speedup"], scale * r["value"]),
                    textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    dense = [r for r in mine if r["method"] == "dense"][0]
    ax.plot([1.0], [scale * dense["value"]], "k*", ms=10, label="dense")
    ax.set(title=f"{task}: channels removed", xlabel="forward-pass speedup (CPU)",
           ylabel="test accuracy (%)" if scale == 100 else "validation loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  _common.save_figure(fig, path)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.shrink",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="the tasks' short epochs")
  parser.add_argument("--tasks", type=sensitivity._names, default=TASKS,  # pylint: disable=protected-access
                      help=f"comma-separated, from {','.join(TASKS)}")
  parser.add_argument("--epochs", type=int, help="epochs of every task (default: per task)")
  parser.add_argument("--fractions", type=sensitivity._floats, default=FRACTIONS,  # pylint: disable=protected-access
                      help="comma-separated shares of channels removed, in (0, 1)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=REPEATS,
                      help="timed forward passes per model, interleaved")
  parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "shrink.json")
  parser.add_argument("--plot", type=pathlib.Path, help="PNG path (default: beside --out)")
  args = parser.parse_args(argv)
  if bad := [t for t in args.tasks if t not in TASKS]:
    parser.error(f"--tasks: unknown {bad}; expected from {TASKS}.")
  if bad := [f for f in args.fractions if not 0.0 < f < 1.0]:
    parser.error(f"--fractions must be in (0, 1); got {bad}.")
  if args.epochs is not None and args.epochs < 2:
    parser.error(f"--epochs must be >= 2; got {args.epochs}.")
  args.plot = args.plot or args.out.with_suffix(".png")
  return args


if __name__ == "__main__":
  main()
