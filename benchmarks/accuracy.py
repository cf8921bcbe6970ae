"""Accuracy against sparsity: log, cubic and one-shot pruning on three tasks.

Run as ``python -m benchmarks.accuracy`` (1 seed, sparsities 0 and 0.9, short
runs: about 2 minutes on 2 busy CPU cores, mostly compiling) or with ``--full``
(3 seeds, sparsities 0 to 0.95, every schedule and task: 117 runs in about 21
minutes there). Tasks:

* ``digits``: the demo's CNN on scikit-learn's 8x8 digits, test accuracy;
* ``mnist1d``: a 1D CNN on MNIST-1D, made locally with
  ``mnist1d.data.make_dataset(get_dataset_args())`` (4000 train, 1000 test),
  test accuracy;
* ``chars``: a small character-level transformer on the Python standard
  library's own source files, validation loss and perplexity.

Each pruned run chains ``magnitude_pruning`` after ``optax.adam`` with one of

* ``log``: ``log_schedule(s, interval_pass=1, end_pass=E)``, every epoch;
* ``cubic``: ``polynomial_schedule(s, begin_step=0, end_step=E * steps,
  frequency=steps)``, every epoch;
* ``one-shot``: ``constant_schedule(s, step=E * steps)``: dense training, one
  cut where the gradual ramps end, then fine-tuning;

where ``E`` is ``END_FRACTION`` of the epochs, so all three reach ``s`` at the
same step and fine-tune for the same number of steps. Sparsity 0 is one
``dense`` run per seed shared by the schedules. Nothing is downloaded.

Pruning ranks all kernels together (``scope="global"``) unless ``--scope
layer``: with one sparsity per layer, 90% leaves the first MNIST-1D
convolution 32 of its 320 weights, and on one seed ``layer`` lost 4.5 to 5.5
points at 0.9 where ``global`` lost 1.1 to 1.3.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import glob
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

import optax_prune
from benchmarks import demo_digits

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

SCHEDULES = ("log", "cubic", "one-shot")
DENSE = "dense"  # The schedule name of the sparsity-0 runs.
# The sparsity rises over the first END_FRACTION of the epochs (and one-shot
# cuts there); the rest fine-tunes at the final sparsity, as in the demo.
END_FRACTION = 2 / 3

FULL = dict(
    tasks=("digits", "mnist1d", "chars"),
    sparsities=(0.0, 0.5, 0.75, 0.9, 0.95),
    seeds=3,
    schedules=SCHEDULES,
)
QUICK = dict(
    tasks=("digits", "mnist1d", "chars"),
    sparsities=(0.0, 0.9),
    seeds=1,
    schedules=SCHEDULES,
)


# ----------------------------------------------------------------- models --


class CNN1D(nn.Module):
  """Three strided convolutions and a linear read-out, as MNIST-1D's CNN.

  Wider than the reference (25 channels) so that 95% sparsity leaves each
  layer more than a handful of weights.
  """

  channels: int = 64
  widths: Optional[tuple[int, int, int]] = None  # Per layer (`benchmarks.shrink`).

  @nn.compact
  def __call__(self, x):
    widths = self.widths or (self.channels,) * 3
    x = x[..., None]  # (batch, 40) -> (batch, 40, 1): one input channel.
    x = nn.relu(nn.Conv(widths[0], (5,), strides=2, padding=1)(x))
    x = nn.relu(nn.Conv(widths[1], (3,), strides=2, padding=1)(x))
    x = nn.relu(nn.Conv(widths[2], (3,), strides=2, padding=1)(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(10)(x)


class Block(nn.Module):
  """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

  heads: int
  mlp: int
  qkv: Optional[int] = None  # Query/key/value width; default: the model's.

  @nn.compact
  def __call__(self, x):
    causal = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.bool_))
    x = x + nn.SelfAttention(self.heads, qkv_features=self.qkv)(nn.LayerNorm()(x), mask=causal)
    h = nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x)))
    return x + nn.Dense(x.shape[-1])(h)


class CharTransformer(nn.Module):
  """A small GPT-style character model: logits for the next character."""

  vocab: int = 128
  context: int = 48
  width: int = 48
  depth: int = 2
  heads: int = 4
  # Shrunk models (`benchmarks.shrink`): MLP and query/key/value widths.
  mlp: Optional[int] = None
  qkv: Optional[int] = None

  @nn.compact
  def __call__(self, tokens):
    position = self.param(
        "position", nn.initializers.normal(0.02), (self.context, self.width)
    )
    x = nn.Embed(self.vocab, self.width)(tokens) + position[: tokens.shape[1]]
    for _ in range(self.depth):
      x = Block(self.heads, self.mlp or 4 * self.width, self.qkv)(x)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


# ------------------------------------------------------------------- data --


@functools.cache
def load_mnist1d():
  """MNIST-1D made locally: (x_train, x_test, y_train, y_test), float32/int32."""
  from mnist1d.data import get_dataset_args, make_dataset

  # `make_dataset` seeds NumPy's global generator (to the args' seed 42): keep
  # the caller's global state as it was.
  saved = np.random.get_state()
  try:
    data = make_dataset(get_dataset_args())
  finally:
    np.random.set_state(saved)
  return (
      data["x"].astype(np.float32), data["x_test"].astype(np.float32),
      data["y"].astype(np.int32), data["y_test"].astype(np.int32),
  )


@functools.cache
def load_digits():
  return tuple(demo_digits.load_digits())


def stdlib_text() -> str:
  """The top-level ``*.py`` files of the standard library, sorted by name."""
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
  return "".join(pathlib.Path(f).read_text(encoding="utf-8") for f in files)


@functools.cache
def load_chars(validation_fraction: float = 0.1):
  """ASCII codes of the stdlib source: (train, validation) uint8 arrays.

  The last files (in name order) are held out, so validation text is unseen
  code, not interleaved windows of the training files. Non-ASCII characters
  become ``?``, so the vocabulary is the 128 ASCII codes.
  """
  codes = np.frombuffer(
      stdlib_text().encode("ascii", errors="replace"), np.uint8
  )
  split = int(len(codes) * (1 - validation_fraction))
  return codes[:split], codes[split:]


# ------------------------------------------------------------------ tasks --


@dataclasses.dataclass(frozen=True)
class Task:
  """A model, its data and how it is scored."""

  name: str
  model: nn.Module
  metric: str  # "test_accuracy" (higher is better) or "val_loss" (lower).
  learning_rate: float
  batch_size: int
  epochs: int  # Of the full run.
  quick_epochs: int  # Of the default, small run.
  example: Callable[[], np.ndarray]  # One input batch, for `init`.
  epoch_batches: Callable[[np.random.Generator], tuple]  # (xs, ys) stacked.
  evaluate: Callable[[Any], float]  # params -> metric.
  steps_per_epoch: int
  where: Optional[Callable[[Any, Any], bool]] = None  # Of magnitude_pruning.


def _classification_task(name, model, data, *, learning_rate, batch_size,
                         epochs, quick_epochs) -> Task:
  x_train, x_test, y_train, y_test = data
  steps = len(x_train) // batch_size

  def epoch_batches(rng):
    # Whole batches only: every step has the same shapes and an epoch is
    # exactly `steps` steps, as the schedules assume.
    order = rng.permutation(len(x_train))[: steps * batch_size]
    order = order.reshape(steps, batch_size)
    return x_train[order], y_train[order]

  @jax.jit
  def accuracy(params):
    logits = model.apply({"params": params}, x_test)
    return jnp.mean(jnp.argmax(logits, -1) == y_test)

  return Task(
      name=name, model=model, metric="test_accuracy",
      learning_rate=learning_rate, batch_size=batch_size, epochs=epochs,
      quick_epochs=quick_epochs, example=lambda: x_train[:1],
      epoch_batches=epoch_batches,
      evaluate=lambda params: float(accuracy(params)), steps_per_epoch=steps,
  )


def validation_windows(context: int) -> np.ndarray:
  """Fixed, evenly spaced validation windows of ``context + 1`` characters:
  every run is scored on the same 25k characters."""
  validation = load_chars()[1]
  starts = np.linspace(0, len(validation) - context - 2, 512).astype(np.int64)
  return validation[starts[:, None] + np.arange(context + 1)]


def _chars_task() -> Task:
  model = CharTransformer()
  train = load_chars()[0]
  # Batches of 16: on XLA:CPU a step of 32 took 3x as long as one of 16.
  context, batch_size, steps = model.context, 16, 50
  windows = validation_windows(context)

  def epoch_batches(rng):
    # An "epoch" is `steps` batches of random windows: the corpus (4 MB) is
    # far larger than what a small run sees, so there is no natural pass.
    starts = rng.integers(0, len(train) - context - 1, (steps, batch_size))
    chunks = train[starts[..., None] + np.arange(context + 1)]
    return chunks[..., :-1].astype(np.int32), chunks[..., 1:].astype(np.int32)

  @jax.jit
  def val_loss(params):
    logits = model.apply({"params": params}, windows[:, :-1].astype(np.int32))
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, windows[:, 1:].astype(np.int32)
    ).mean()

  def where(path, leaf):
    # The Dense and attention kernels, as in most language-model pruning: not
    # the token and position tables, whose scales (1 and 0.02 at init) would
    # put the whole position table first in a global ranking.
    name = jax.tree_util.keystr(path)
    return leaf.ndim >= 2 and "Embed" not in name and "position" not in name

  return Task(
      name="chars", model=model, metric="val_loss", learning_rate=3e-3,
      batch_size=batch_size, epochs=16, quick_epochs=4,
      example=lambda: np.zeros((1, context), np.int32),
      epoch_batches=epoch_batches,
      evaluate=lambda params: float(val_loss(params)), steps_per_epoch=steps,
      where=where,
  )


def make_task(name: str) -> Task:
  if name == "digits":
    return _classification_task(
        "digits", demo_digits.CNN(), load_digits(), learning_rate=1e-3,
        batch_size=64, epochs=45, quick_epochs=12,
    )
  if name == "mnist1d":
    return _classification_task(
        "mnist1d", CNN1D(), load_mnist1d(), learning_rate=3e-3,
        batch_size=100, epochs=60, quick_epochs=15,
    )
  if name == "chars":
    return _chars_task()
  raise ValueError(f"unknown task {name!r}; expected one of {FULL['tasks']}.")


# --------------------------------------------------------------- training --


def make_schedule(name: str, sparsity: float, end_pass: int, steps: int):
  """The pruning schedule `name`, reaching `sparsity` at epoch `end_pass`."""
  if name == DENSE:
    return optax_prune.constant_schedule(0.0)
  if name == "log":
    return optax_prune.log_schedule(
        sparsity, interval_pass=1, end_pass=end_pass, steps_per_epoch=steps
    )
  if name == "cubic":
    return optax_prune.polynomial_schedule(
        sparsity, begin_step=0, end_step=end_pass * steps, frequency=steps
    )
  if name == "one-shot":
    return optax_prune.constant_schedule(sparsity, step=end_pass * steps)
  raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}.")


def make_train_step(task: Task):
  """One optimizer step, jitted: fn(state, x, y) -> state."""

  def loss_fn(params, x, y):
    logits = task.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train_step(state, x, y):
    grads = jax.grad(loss_fn)(state.params, x, y)
    # `apply_gradients` passes the params to `tx.update`, as pruning needs.
    return state.apply_gradients(grads=grads)

  # Not a `lax.scan` over an epoch: on XLA:CPU the convolutions inside a loop
  # ran 5 to 20 times slower than one jitted step called from Python.
  # The state is consumed: donating it lets XLA update it in place.
  return jax.jit(train_step, donate_argnums=0)


def measured_sparsity(state) -> float:
  """Pruned fraction of the pruned leaves (kernels), read from the masks."""
  masks = optax_prune.find_pruning_state(state.opt_state).masks
  return optax_prune.sparsity_summary(state.params, masks).masked_sparsity


def run_config(task: Task, schedule_name: str, sparsity: float, seeds: int,
               epochs: int, scope: str, bar: tqdm,
               granularity: Callable[[Any], Any] = lambda params: None,
               ) -> dict[str, Any]:
  """Trains one (task, schedule, sparsity) for every seed; one record.

  ``granularity(abstract_params)`` gives ``magnitude_pruning``'s
  ``granularity`` argument (default: unstructured).
  """
  steps = task.steps_per_epoch
  # The last epoch that starts before training ends, so the final sparsity is
  # reached (and fine-tuned) also in very short runs.
  end_pass = min(max(1, round(epochs * END_FRACTION)), epochs - 1)
  schedule = make_schedule(schedule_name, sparsity, end_pass, steps)
  # Dense runs chain `magnitude_pruning(constant_schedule(0.0))`: every mask
  # stays true, so its updates are exactly adam's, and the measured sparsity
  # is read from masks like every other run's.
  init = jax.jit(task.model.init)
  shapes = jax.eval_shape(init, jax.random.key(0), task.example())["params"]
  tx = optax.chain(
      optax.adam(task.learning_rate),
      # Uniform: with `--scope layer`, every kernel at the scheduled sparsity
      # (benchmarks.defaults compares ERK and the others).
      optax_prune.magnitude_pruning(schedule, where=task.where, scope=scope,
                                    granularity=granularity(shapes),
                                    distribution="uniform"),
  )
  train_step = make_train_step(task)
  compiled = None
  values, sparsities, walls, trajectory = [], [], [], None
  for seed in range(seeds):
    bar.set_description(f"{task.name} {schedule_name} {sparsity:g} seed {seed}")
    params = init(jax.random.key(seed), task.example())["params"]
    size = sum(x.size for x in jax.tree.leaves(params))
    state = train_state.TrainState.create(
        apply_fn=task.model.apply, params=params, tx=tx
    )
    rng = np.random.default_rng(seed)
    if compiled is None:
      # Compiled once per configuration (the schedule is a closure in the
      # static `tx`), ahead of time so that it is timed apart from training.
      start = time.perf_counter()
      xs, ys = task.epoch_batches(np.random.default_rng(seed))
      compiled = train_step.lower(state, xs[0], ys[0]).compile()
      compile_s = time.perf_counter() - start
    epoch_sparsity = []
    start = time.perf_counter()
    for _ in range(epochs):
      for x, y in zip(*task.epoch_batches(rng)):
        state = compiled(state, x, y)
      if seed == 0:
        epoch_sparsity.append(measured_sparsity(state))
    jax.block_until_ready(state)
    walls.append(time.perf_counter() - start)
    values.append(task.evaluate(state.params))
    sparsities.append(measured_sparsity(state))
    summary = optax_prune.sparsity_summary(
        state.params, optax_prune.find_pruning_state(state.opt_state).masks
    )
    prunable = sum(r.size for r in summary.rows if r.pruned is not None)
    if seed == 0:
      # Every schedule here changes only at the first step of an epoch, so
      # its values there describe it whole.
      starts = jnp.arange(epochs, dtype=jnp.int32) * steps
      trajectory = {
          "epoch_start_step": np.asarray(starts).tolist(),
          "target_sparsity": np.asarray(jax.vmap(schedule)(starts).sparsity,
                                        np.float64).tolist(),
          # Read from the masks after the last step of each epoch.
          "step": [(e + 1) * steps - 1 for e in range(epochs)],
          "measured_sparsity": epoch_sparsity,
      }
    bar.update()

  record = {
      "task": task.name,
      "schedule": schedule_name,
      "sparsity": sparsity,
      "scope": scope,
      "metric": task.metric,
      "seeds": list(range(seeds)),
      "values": values,
      "mean": float(np.mean(values)),
      # Sample standard deviation over seeds (0 for a single seed).
      "std": float(np.std(values, ddof=1)) if seeds > 1 else 0.0,
      "measured_sparsity": float(np.mean(sparsities)),
      "measured_sparsity_per_seed": sparsities,
      "wall_s": float(np.mean(walls)),
      "wall_s_per_seed": walls,
      "compile_s": compile_s,
      "epochs": epochs,
      "steps_per_epoch": steps,
      "end_step": 0 if schedule_name == DENSE else end_pass * steps,
      "batch_size": task.batch_size,
      "learning_rate": task.learning_rate,
      "params": int(size),
      "prunable_params": int(prunable),  # In the leaves that have masks.
      "trajectory": trajectory,
  }
  if task.metric == "val_loss":
    perplexities = [math.exp(v) for v in values]
    record["perplexity_mean"] = float(np.mean(perplexities))
    record["perplexity_std"] = (
        float(np.std(perplexities, ddof=1)) if seeds > 1 else 0.0
    )
  return record


# --------------------------------------------------------------- reporting --


def table(records: Sequence[dict[str, Any]]) -> str:
  header = ("task", "schedule", "sparsity", "metric", "mean ± std",
            "perplexity", "measured", "wall s", "compile s")
  rows = []
  for r in records:
    if r["metric"] == "test_accuracy":
      value = f"{r['mean']:.2%} ± {r['std']:.2%}"
      perplexity = "-"
    else:
      value = f"{r['mean']:.4f} ± {r['std']:.4f}"
      perplexity = f"{r['perplexity_mean']:.3f} ± {r['perplexity_std']:.3f}"
    rows.append((
        r["task"], r["schedule"], f"{r['sparsity']:.2f}", r["metric"], value,
        perplexity, f"{r['measured_sparsity']:.4f}", f"{r['wall_s']:.1f}",
        f"{r['compile_s']:.1f}",
    ))
  widths = [max(len(c) for c in col) for col in zip(header, *rows)]
  fmt = lambda cells: "  ".join(
      c.ljust(w) if i < 2 else c.rjust(w)
      for i, (c, w) in enumerate(zip(cells, widths))
  )
  return "\n".join(
      [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
  )


def targets(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The issue's targets, checked where the run has the configurations.

  On digits and MNIST-1D: at 0.9 each gradual schedule's mean accuracy within
  1.0 percentage point of dense; at 0.95 each gradual schedule above one-shot.
  Reported, not asserted.
  """
  find = {(r["task"], r["schedule"], r["sparsity"]): r for r in records}
  out = []
  for task in ("digits", "mnist1d"):
    dense = find.get((task, DENSE, 0.0))
    for schedule in ("log", "cubic"):
      pruned = find.get((task, schedule, 0.9))
      if dense and pruned:
        gap = dense["mean"] - pruned["mean"]
        out.append({
            "target": "0.9 within 1.0 pp of dense", "task": task,
            "schedule": schedule, "gap_pp": 100 * gap,
            "seeds": len(pruned["values"]), "met": bool(gap <= 0.01),
        })
      pruned = find.get((task, schedule, 0.95))
      one_shot = find.get((task, "one-shot", 0.95))
      if pruned and one_shot:
        margin = pruned["mean"] - one_shot["mean"]
        out.append({
            "target": "0.95 above one-shot", "task": task,
            "schedule": schedule, "margin_pp": 100 * margin,
            "seeds": len(pruned["values"]), "met": bool(margin > 0),
        })
  return out


def describe_target(t: dict[str, Any]) -> str:
  verdict = "met" if t["met"] else "NOT met"
  if "gap_pp" in t:
    figure = f"dense - pruned = {t['gap_pp']:+.2f} pp"
  else:
    figure = f"pruned - one-shot = {t['margin_pp']:+.2f} pp"
  return (f"{t['task']:>8} {t['schedule']:>5}: {t['target']}: {figure}"
          f" ({t['seeds']} seeds): {verdict}")


def plot(records: Sequence[dict[str, Any]], accuracy_png: pathlib.Path,
         steps_png: pathlib.Path) -> None:
  """Metric against sparsity per schedule; sparsity against training step."""
  import matplotlib

  matplotlib.use("Agg")  # Files only: no display on CI machines.
  import matplotlib.pyplot as plt

  tasks = list(dict.fromkeys(r["task"] for r in records))
  schedules = [s for s in SCHEDULES if any(r["schedule"] == s for r in records)]
  colors = dict(zip(SCHEDULES, ("C0", "C1", "C2")))

  fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4),
                           layout="constrained", squeeze=False)
  for ax, task in zip(axes[0], tasks):
    mine = [r for r in records if r["task"] == task]
    dense = [r for r in mine if r["schedule"] == DENSE]
    for i, schedule in enumerate(schedules or [DENSE]):
      # Every schedule's line starts from the shared dense runs.
      points = sorted(dense + [r for r in mine if r["schedule"] == schedule],
                      key=lambda r: r["sparsity"])
      x = np.array([r["sparsity"] for r in points]) + 0.004 * (i - 1)
      scale = 100 if mine[0]["metric"] == "test_accuracy" else 1
      ax.errorbar(x, [scale * r["mean"] for r in points],
                  yerr=[scale * r["std"] for r in points], marker="o", ms=4,
                  capsize=3, label=schedule, color=colors.get(schedule, "C7"))
    metric = mine[0]["metric"]
    ax.set(title=f"{task} ({len(mine[0]['values'])} seeds)",
           xlabel="final sparsity of the kernels",
           ylabel="test accuracy (%)" if metric == "test_accuracy"
           else "validation loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  accuracy_png.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(accuracy_png, dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4),
                           layout="constrained", squeeze=False)
  for ax, task in zip(axes[0], tasks):
    pruned = [r for r in records if r["task"] == task and r["schedule"] != DENSE]
    if not pruned:
      continue
    top = max(r["sparsity"] for r in pruned)
    for r in pruned:
      if r["sparsity"] != top:
        continue
      t = r["trajectory"]
      color = colors[r["schedule"]]
      ax.step(t["epoch_start_step"] + [t["step"][-1]],
              t["target_sparsity"] + t["target_sparsity"][-1:], where="post",
              color=color, lw=1.2, label=f"{r['schedule']} target")
      ax.plot(t["step"], t["measured_sparsity"], "o", color=color, ms=3,
              label=f"{r['schedule']} masks")
    ax.axvline(pruned[0]["end_step"], color="0.5", ls=":", lw=1)
    ax.set(title=f"{task}: final sparsity {top:g}",
           xlabel="training step", ylabel="sparsity of the kernels",
           ylim=(-0.02, 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.savefig(steps_png, dpi=110)
  plt.close(fig)


def machine_info(argv: Sequence[str]) -> dict[str, Any]:
  return {
      "command": " ".join(["python -m benchmarks.accuracy", *argv]),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "load_average_at_start": list(os.getloadavg()),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "optax": optax.__version__,
      "flax": flax.__version__,
      "optax_prune": optax_prune.__version__,
      "std": "sample standard deviation over seeds (ddof=1)",
      "wall_s": "training seconds per seed, compile excluded (compile_s)",
  }


# -------------------------------------------------------------------- main --


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(","))


def _names(text: str) -> tuple[str, ...]:
  return tuple(x for x in text.split(",") if x)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.accuracy",
      description=__doc__.split("\n")[0],
  )
  parser.add_argument("--full", action="store_true",
                      help="3 seeds, sparsities 0,0.5,0.75,0.9,0.95, every"
                      " schedule and task, full epochs")
  parser.add_argument("--tasks", type=_names,
                      help=f"comma-separated, from {','.join(FULL['tasks'])}")
  parser.add_argument("--sparsities", type=_floats,
                      help="comma-separated final sparsities; 0 is the dense"
                      " run")
  parser.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...)")
  parser.add_argument("--schedules", type=_names,
                      help=f"comma-separated, from {','.join(SCHEDULES)}")
  parser.add_argument("--epochs", type=int,
                      help="epochs of every task (default: per task)")
  parser.add_argument("--scope", choices=("global", "layer"),
                      default="global",
                      help="magnitude_pruning's scope (default: global)")
  parser.add_argument("--out", type=pathlib.Path,
                      help="JSON path (default: benchmarks/results/accuracy.json"
                      " with --full, else accuracy_quick.json beside it)")
  parser.add_argument("--plot", type=pathlib.Path, nargs=2,
                      metavar=("METRIC_PNG", "STEPS_PNG"),
                      help="PNG paths (default: beside --out, <stem>.png and"
                      " <stem>_steps.png)")
  parser.add_argument("--no-plot", action="store_true")
  args = parser.parse_args(argv)
  defaults = FULL if args.full else QUICK
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if bad := [t for t in args.tasks if t not in FULL["tasks"]]:
    parser.error(f"--tasks: unknown {bad}; expected from {FULL['tasks']}.")
  if bad := [s for s in args.schedules if s not in SCHEDULES]:
    parser.error(f"--schedules: unknown {bad}; expected from {SCHEDULES}.")
  if bad := [s for s in args.sparsities if not 0.0 <= s <= 1.0]:
    parser.error(f"--sparsities must be in [0, 1]; got {bad}.")
  if args.seeds < 1:
    parser.error(f"--seeds must be >= 1; got {args.seeds}.")
  if args.epochs is not None and args.epochs < 1:
    parser.error(f"--epochs must be >= 1; got {args.epochs}.")
  if args.out is None:
    # A quick run must not overwrite the full run's results.
    args.out = RESULTS / ("accuracy.json" if args.full else "accuracy_quick.json")
  if args.plot is None:
    stem = args.out.with_suffix("")
    args.plot = (stem.with_suffix(".png"),
                 stem.with_name(stem.name + "_steps.png"))
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the benchmark; returns (and saves) {"header": ..., "records": ...}."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  header = machine_info(argv)
  configs = []
  for name in args.tasks:
    if 0.0 in args.sparsities:
      configs.append((name, DENSE, 0.0))
    configs += [(name, schedule, s) for schedule in args.schedules
                for s in args.sparsities if s != 0.0]

  records = []
  start = time.perf_counter()
  with tqdm(total=len(configs) * args.seeds, unit="run") as bar:
    tasks = {}
    for name, schedule, sparsity in configs:
      if name not in tasks:
        tasks[name] = make_task(name)
      task = tasks[name]
      epochs = args.epochs or (task.epochs if args.full else task.quick_epochs)
      records.append(
          run_config(task, schedule, sparsity, args.seeds, epochs,
                     args.scope, bar)
      )
  header["total_wall_s"] = time.perf_counter() - start
  result = {"header": header, "records": records,
            "targets": targets(records)}

  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=1) + "\n")
  print()
  print(table(records))
  if result["targets"]:
    print()
    print("targets (reported, not asserted):")
    if not args.full:
      print("  (a quick run: the targets are meant for --full, 3 seeds)")
    for t in result["targets"]:
      print("  " + describe_target(t))
  print()
  print(f"wrote {args.out} ({header['total_wall_s']:.0f} s)")
  if not args.no_plot:
    plot(records, *args.plot)
    print(f"wrote {args.plot[0]} and {args.plot[1]}")
  return result


if __name__ == "__main__":
  main()
