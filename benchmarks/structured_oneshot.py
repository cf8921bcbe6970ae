"""One-shot coupled-channel pruning by four importances, fine-tuned, beside gradual.

Run as ``python -m benchmarks.structured_oneshot`` (the digits CNN, the
MNIST-1D CNN and the character transformer of ``benchmarks.accuracy``, a
quarter and half of the prunable channels and heads removed, the tasks' full
epochs, 200 fine-tuning steps, 1 seed) or with ``--quick`` (short epochs, 50
fine-tuning steps). Per task, with the groups that
``benchmarks.shrink.prunable_groups`` chooses:

* ``dense``: ``optax.adam`` for the task's epochs, from seed ``--seed`` (the
  initialisation and batches of ``benchmarks.shrink``'s dense run);
* one-shot, for each fraction and importance of ``coupled_channels``:
  ``prune(dense, fraction, granularity=coupled_channels(groups,
  importance=...))``, scored as it is (``one_shot``), then fine-tuned for
  ``--finetune-steps`` steps with ``chain(adam, magnitude_pruning(fraction,
  granularity=the same coupled_channels))``, whose mask update at step 0
  keeps exactly the one-shot channels (the pruned ones are zero; checked),
  and scored again (``finetuned``). Importances:

  - ``weight``: the members' L2 norms;
  - ``bn_scale``: ``|gamma|`` of the BatchNorm in a group; only the groups
    that have one are pruned, and a task with none skips it (all three here);
  - ``taylor``: ``|sum w * g|``, ``g`` the training loss's gradient at the
    dense params averaged over ``--calibration-batches`` training batches;
  - ``activation``: the channels' input norms (``input_norms``) over the
    inputs of those same batches;

* ``gradual``: ``benchmarks.shrink``'s method at the same fraction, trained
  from the dense run's initialisation with ``chain(adam,
  magnitude_pruning(cubic, granularity=coupled_channels(groups)))``, the
  cubic schedule reaching the fraction at 2/3 of the epochs.

Every pruned result is shrunk (``shrink``) and the model rebuilt with the new
widths; its outputs are checked against the masked model's on the evaluation
set (``max_abs_diff``), and its kept channel counts against ``C - round(s C)``.
A record's ``finetuned`` is its final metric (``dense`` and ``gradual`` too);
``one_shot`` is set for the one-shot records only.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

import optax_prune
from benchmarks import _common
from benchmarks import accuracy
from benchmarks import sensitivity
from benchmarks import shrink

TASKS = shrink.TASKS
FRACTIONS = (0.25, 0.5)
IMPORTANCES = ("weight", "bn_scale", "taylor", "activation")
FINETUNE_STEPS = 200
QUICK_FINETUNE_STEPS = 50
CALIBRATION_BATCHES = 4


def has_bn_scale(group) -> bool:
  """Whether a group holds a BatchNorm scale (the rule of ``importance="bn_scale"``)."""
  return any(view[0].endswith("['scale']") for view in group.views())


def kept_counts(chosen, fraction: float) -> dict[str, int]:
  """Each group's ``C - round(s C)``, rounded half to even as the library does."""
  return {g.name: g.size - int(np.round(np.float32(fraction) * g.size)) for g in chosen}


def loss_fn(task: accuracy.Task):
  def loss(params, x, y):
    logits = task.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


def calibration(task: accuracy.Task, seed: int, count: int) -> list[tuple[Any, Any]]:
  """``count`` training batches ``(x, y)``, drawn apart from the training order."""
  rng = np.random.default_rng([seed, 1])
  batches = []
  while len(batches) < count:
    xs, ys = task.epoch_batches(rng)
    batches += list(zip(xs, ys))
  return batches[:count]


def mean_gradient(task: accuracy.Task, params, batches):
  grad = jax.jit(jax.grad(loss_fn(task)))
  total = None
  for x, y in batches:
    g = grad(params, x, y)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  return jax.tree.map(lambda t: t / len(batches), total)


def mask_leaves(masks) -> list[np.ndarray]:
  """The bool masks of the pruned leaves (``MaskedNode`` holds none)."""
  return [np.asarray(m) for m in jax.tree.leaves(masks)]


def same_masks(a, b) -> bool:
  a, b = mask_leaves(a), mask_leaves(b)
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def finetune(task: accuracy.Task, params, masks, tx, steps: int, seed: int, train_step):
  """``steps`` of ``tx`` from ``params``; checks that its masks are ``masks``."""
  # A copy: the train step donates its state, and `prune` returns the leaves it
  # does not prune as they were (the dense params' own buffers).
  params = jax.tree.map(jnp.copy, params)
  state = train_state.TrainState.create(apply_fn=task.model.apply, params=params, tx=tx)
  rng = np.random.default_rng([seed, 2])
  done = 0
  while done < steps:
    for x, y in zip(*task.epoch_batches(rng)):
      state = train_step(state, x, y)
      done += 1
      if done == 1:
        # The step-0 mask update ranks the one-shot params: the pruned channels
        # are exactly zero, so it must keep exactly the one-shot channels.
        kept = optax_prune.find_pruning_state(state.opt_state).masks
        if not same_masks(kept, masks):  # Not `assert`: kept under `python -O`.
          raise AssertionError("fine-tuning's step-0 masks differ from prune's")
      if done == steps:
        break
  final = optax_prune.find_pruning_state(state.opt_state).masks
  if not same_masks(final, masks):
    raise AssertionError("the masks moved during fine-tuning")
  return jax.block_until_ready(state.params)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, x):
  # The model is static (flax modules hash by their fields): every shrunk model
  # of the same widths shares one compiled forward pass.
  return model.apply({"params": params}, x)


class Scorer:
  """A task's metric of shrunk params, and the check against the masked model."""

  def __init__(self, name: str, task: accuracy.Task):
    self.name, self.task = name, task
    self.inputs, self.metric = shrink.evaluation(name)

  def shrunk(self, masked, fraction: float, groups) -> dict[str, Any]:
    """Shrinks ``groups`` of ``masked``: its metric, parameter count, sizes and
    the largest difference of the shrunk model's logits from the masked model's."""
    small = optax_prune.shrink(groups, masked)
    expected = kept_counts(groups, fraction)
    if small.sizes != expected:
      raise AssertionError(f"kept channels {small.sizes}, expected {expected}")
    model = shrink.rebuild(self.name, small.params)
    logits = _apply(model, small.params, self.inputs)
    diff = float(jnp.max(jnp.abs(logits - _apply(self.task.model, masked, self.inputs))))
    return {"value": self.metric(logits), "params": shrink.count(small.params),
            "sizes": small.sizes, "max_abs_diff": diff}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  start = time.perf_counter()
  records, analyses = [], {}
  runs = len(args.tasks) * (1 + len(args.fractions) * (1 + len(IMPORTANCES)))
  with tqdm(total=runs, unit="run") as bar:
    for name in args.tasks:
      task = accuracy.make_task(name)
      epochs = args.epochs or (task.quick_epochs if args.quick else task.epochs)
      groups, chosen = shrink.prunable_groups(task)
      with_bn = [g for g in chosen if has_bn_scale(g)]
      scorer = Scorer(name, task)
      train_step = accuracy.make_train_step(task)
      adam = optax.adam(task.learning_rate)
      base = {"task": name, "metric": task.metric, "epochs": epochs}

      bar.set_description(f"{name} dense")
      began = time.perf_counter()
      dense = sensitivity.train(task, args.seed, epochs, adam, train_step).params
      dense_count = shrink.count(dense)
      base["dense_params"] = dense_count
      records.append({**base, "method": "dense", "importance": "-", "fraction": 0.0,
                      "params": dense_count, "one_shot": None,
                      "finetuned": task.evaluate(dense), "wall_s": time.perf_counter() - began})
      bar.update()

      batches = calibration(task, args.seed, args.calibration_batches)
      grads = mean_gradient(task, dense, batches)
      norms = optax_prune.input_norms(
          lambda p, x: task.model.apply({"params": p}, x), dense, [x for x, _ in batches])
      skipped = {}
      if not with_bn:
        skipped["bn_scale"] = "no pruned group has a BatchNorm scale"
      analyses[name] = {
          "groups": str(groups), "pruned": [g.name for g in chosen],
          "sizes": {g.name: g.size for g in chosen},
          "bn_scale_groups": [g.name for g in with_bn], "skipped": skipped,
          "calibration_batches": args.calibration_batches,
          "finetune_steps": args.finetune_steps}

      for fraction in args.fractions:
        for importance in IMPORTANCES:
          bar.set_description(f"{name} {importance} {fraction:g}")
          if importance in skipped:
            bar.update()
            continue
          members = with_bn if importance == "bn_scale" else chosen
          granularity = optax_prune.coupled_channels(
              members, importance=importance,
              input_norms=norms if importance == "activation" else None)
          began = time.perf_counter()
          pruned, masks = optax_prune.prune(
              dense, fraction, granularity=granularity,
              grads=grads if importance == "taylor" else None)
          one_shot = task.evaluate(pruned)
          shrunk_one_shot = scorer.shrunk(pruned, fraction, members)
          tx = optax.chain(adam, optax_prune.magnitude_pruning(fraction,
                                                               granularity=granularity))
          tuned = finetune(task, pruned, masks, tx, args.finetune_steps, args.seed,
                           train_step)
          record = {**base, "method": "one-shot", "importance": importance,
                    "fraction": fraction, "groups": [g.name for g in members],
                    "one_shot": one_shot, "finetuned": task.evaluate(tuned),
                    "wall_s": time.perf_counter() - began}
          after = scorer.shrunk(tuned, fraction, members)
          record.update(params=shrunk_one_shot["params"], sizes=shrunk_one_shot["sizes"],
                        max_abs_diff=shrunk_one_shot["max_abs_diff"],
                        shrunk_one_shot=shrunk_one_shot["value"],
                        max_abs_diff_finetuned=after["max_abs_diff"],
                        shrunk_finetuned=after["value"])
          records.append(record)
          bar.update()

        # benchmarks.shrink's recipe (its `shrunk` method): cubic to the
        # fraction at END_FRACTION of the epochs, every epoch, then fine-tuning.
        bar.set_description(f"{name} gradual {fraction:g}")
        steps = task.steps_per_epoch
        end = min(max(1, round(epochs * accuracy.END_FRACTION)), epochs - 1) * steps
        cubic = optax_prune.polynomial_schedule(fraction, begin_step=0, end_step=end,
                                                frequency=steps)
        tx = optax.chain(adam, optax_prune.magnitude_pruning(
            cubic, granularity=optax_prune.coupled_channels(chosen)))
        began = time.perf_counter()
        masked = sensitivity.train(task, args.seed, epochs, tx, train_step).params
        small = scorer.shrunk(masked, fraction, chosen)
        records.append({**base, "method": "gradual", "importance": "weight",
                        "fraction": fraction, "groups": [g.name for g in chosen],
                        "one_shot": None, "finetuned": task.evaluate(masked),
                        "params": small["params"], "sizes": small["sizes"],
                        "max_abs_diff": small["max_abs_diff"], "shrunk_finetuned": small["value"],
                        "wall_s": time.perf_counter() - began})
        bar.update()
  total = time.perf_counter() - start
  header = {"command": " ".join(["python -m benchmarks.structured_oneshot", *argv]),
            "tasks": list(args.tasks), "fractions": list(args.fractions),
            "importances": list(IMPORTANCES), "seed": args.seed,
            "finetune_steps": args.finetune_steps,
            "calibration_batches": args.calibration_batches, "analyses": analyses,
            "total_wall_s": total}
  _common.write_json(args.out, records, **header)
  print()
  print("one-shot coupled-channel pruning of the dense model by importance, before and"
        f" after {args.finetune_steps} fine-tuning steps, beside gradual (cubic) pruning")
  print(table(records))
  for name, analysis in analyses.items():
    for importance, why in analysis["skipped"].items():
      print(f"{name}: {importance} skipped ({why})")
  plot(records, args.plot)
  print(f"\nwrote {args.out} and {args.plot} ({total:.0f} s)")
  return {"header": header, "records": records}


def _value(r: dict, key: str) -> str:
  if r.get(key) is None:
    return "-"
  return (f"{100 * r[key]:.2f}%" if r["metric"] == "test_accuracy" else f"{r[key]:.4f}")


def table(records: Sequence[dict]) -> str:
  rows = []
  for r in records:
    rows.append((r["task"], f"{r['fraction']:g}", r["method"], r["importance"],
                 _value(r, "one_shot"), _value(r, "finetuned"), f"{r['params']:,}",
                 f"{r['params'] / r['dense_params']:.3f}",
                 f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"))
  return _common.table(rows, ("task", "removed", "method", "importance", "one-shot",
                              "fine-tuned / final", "params", "of dense", "max |diff|"))


def plot(records: Sequence[dict], path: pathlib.Path) -> None:
  """Per task: the metric against the fraction removed, per importance, one-shot
  (dashed) and fine-tuned (solid), with gradual pruning and dense as markers."""
  import matplotlib

  matplotlib.use("Agg")  # Files only: no display on CI machines.
  import matplotlib.pyplot as plt

  tasks = list(dict.fromkeys(r["task"] for r in records))
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 4), squeeze=False)
  colors = dict(zip(IMPORTANCES, ("C0", "C3", "C1", "C2")))
  for ax, task in zip(axes[0], tasks):
    mine = [r for r in records if r["task"] == task]
    scale = 100 if mine[0]["metric"] == "test_accuracy" else 1
    for importance in IMPORTANCES:
      rs = sorted((r for r in mine if r["method"] == "one-shot"
                   and r["importance"] == importance), key=lambda r: r["fraction"])
      if not rs:
        continue
      fractions = [r["fraction"] for r in rs]
      ax.plot(fractions, [scale * r["one_shot"] for r in rs], "o--", mfc="none",
              color=colors[importance], alpha=0.7)
      ax.plot(fractions, [scale * r["finetuned"] for r in rs], "o-",
              color=colors[importance], label=importance)
    gradual = sorted((r for r in mine if r["method"] == "gradual"), key=lambda r: r["fraction"])
    ax.plot([r["fraction"] for r in gradual], [scale * r["finetuned"] for r in gradual],
            "k*", ms=11, label="gradual (cubic)")
    dense = [r for r in mine if r["method"] == "dense"][0]
    ax.axhline(scale * dense["finetuned"], color="0.4", ls=":", lw=1, label="dense")
    ax.set(title=f"{task}: dashed one-shot, solid fine-tuned",
           xlabel="fraction of channels removed",
           ylabel="test accuracy (%)" if scale == 100 else "validation loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  _common.save_figure(fig, path)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.structured_oneshot",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"the tasks' short epochs, {QUICK_FINETUNE_STEPS} fine-tuning steps")
  parser.add_argument("--tasks", type=sensitivity._names, default=TASKS,  # pylint: disable=protected-access
                      help=f"comma-separated, from {','.join(TASKS)}")
  parser.add_argument("--epochs", type=int, help="epochs of every task (default: per task)")
  parser.add_argument("--fractions", type=sensitivity._floats, default=FRACTIONS,  # pylint: disable=protected-access
                      help="comma-separated shares of channels removed, in (0, 1)")
  parser.add_argument("--finetune-steps", type=int,
                      help=f"steps after one-shot pruning (default {FINETUNE_STEPS},"
                      f" --quick {QUICK_FINETUNE_STEPS})")
  parser.add_argument("--calibration-batches", type=int, default=CALIBRATION_BATCHES,
                      help="training batches for the taylor gradient and activation norms")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path,
                      help="JSON path (default: benchmarks/results/structured_oneshot.json,"
                      " with --quick structured_oneshot_quick.json)")
  parser.add_argument("--plot", type=pathlib.Path, help="PNG path (default: beside --out)")
  args = parser.parse_args(argv)
  if bad := [t for t in args.tasks if t not in TASKS]:
    parser.error(f"--tasks: unknown {bad}; expected from {TASKS}.")
  if bad := [f for f in args.fractions if not 0.0 < f < 1.0]:
    parser.error(f"--fractions must be in (0, 1); got {bad}.")
  if args.epochs is not None and args.epochs < 2:
    parser.error(f"--epochs must be >= 2 (gradual pruning ends before the last); got"
                 f" {args.epochs}.")
  if args.finetune_steps is None:
    args.finetune_steps = QUICK_FINETUNE_STEPS if args.quick else FINETUNE_STEPS
  if args.finetune_steps < 1:
    parser.error(f"--finetune-steps must be >= 1; got {args.finetune_steps}.")
  if args.calibration_batches < 1:
    parser.error(f"--calibration-batches must be >= 1; got {args.calibration_batches}.")
  if args.out is None:
    args.out = _common.RESULTS / ("structured_oneshot_quick.json" if args.quick
                                  else "structured_oneshot.json")
  args.plot = args.plot or args.out.with_suffix(".png")
  return args


if __name__ == "__main__":
  main()
