"""Overhead of pruning on a train step that does not recompute masks.

Run as ``python -m benchmarks.step_overhead``. For the digits CNN of the demo
and an MLP of about 3.7M parameters it times a full jitted train step (forward,
backward, optimizer) with ``optax.adam`` alone and with
``optax.chain(optax.adam, magnitude_pruning(...))`` with bool masks and with
bit-packed masks (``packed_masks=True``), and with packed masks in a step
compiled with ``update_masks=False`` (no conditional), interleaved, on steps
after the one-shot mask update, and prints the ratios of minimum step times (and of
medians) and the bytes of the masks in the state. Saves
``benchmarks/results/step_overhead.json``.

With ``--sparse-training`` it times instead, against adam alone, the steps of
every sparse-training method (``rigl``, ``set_training``, ``static_sparse``,
``straight_through``) beside gradual pruning, at sparsity 0.9: a step that
does not update masks (the default, decided inside the step) and a step
compiled with ``update_masks=True`` (the mask update itself). Saves
``benchmarks/results/step_overhead_sparse.json``.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import optax_prune
from benchmarks import _common
from benchmarks import demo_digits
from optax_prune import _thresholds


class MLP(nn.Module):
  """784 -> 2048 -> 1024 -> 10: about 3.7M parameters."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(2048)(x))
    x = nn.relu(nn.Dense(1024)(x))
    return nn.Dense(10)(x)


class TinyMLP(nn.Module):
  """16 -> 16 -> 10: the smoke test's model (two small kernels, less to compile)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(16)(x)))


MODELS = {
    "digits-cnn": (demo_digits.CNN, (8, 8, 1)),
    "mlp-3.7M": (MLP, (784,)),
    "tiny-mlp": (TinyMLP, (16,)),
}
DEFAULT_MODELS = ("digits-cnn", "mlp-3.7M")  # What RESULTS reports; tiny-mlp is the smoke test's.


def make_step(model, tx, update_masks=None):
  """A jitted train step; ``update_masks`` as in ``magnitude_pruning`` (None:
  decided inside the step; False: the step compiled without mask update)."""
  def loss(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  extra = {} if update_masks is None else {"update_masks": update_masks}

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return step


def compile_times(model, tx, params, x, y, modes=(None, False, True)) -> dict[str, float]:
  """Seconds to lower and compile the step: one step deciding mask updates
  inside (``None``), and the two steps of a loop that decides (``False``,
  ``True``)."""
  state = tx.init(params)
  out = {}
  for update_masks in modes:
    start = time.perf_counter()
    make_step(model, tx, update_masks).lower(params, state, x, y).compile()
    out[str(update_masks)] = time.perf_counter() - start
  return out


def sparse_training_optimizers() -> dict:
  """Each method at sparsity 0.9, on steps after 0 that do not update masks."""
  adam = lambda: optax.adam(1e-3)
  late = dict(end_step=2**30, frequency=2**29)  # Mask updates far away.
  return {
      "adam": adam(),
      "gradual": optax.chain(adam(), optax_prune.magnitude_pruning(0.9)),
      "static": optax.chain(adam(), optax_prune.static_sparse(0.9)),
      "set": optax_prune.set_training(adam(), 0.9, **late),
      "rigl": optax_prune.rigl(adam(), 0.9, **late),
      "ste": optax.chain(adam(), optax_prune.straight_through(0.9)),
  }


def sparse_training(model, params, x, y, repeats: int) -> dict:
  """Minimum step times of each method, interleaved, and of its mask update."""
  steps, updates = {}, {}
  for label, tx in sparse_training_optimizers().items():
    state = tx.init(params)
    p, state = make_step(model, tx)(params, state, x, y)  # Past step 0.
    step = make_step(model, tx)
    steps[label] = lambda step=step, p=p, state=state: step(p, state, x, y)
    if label not in ("adam", "static"):  # Static masks never update.
      # Compiled without the mask update (no conditional, no host read).
      fixed = make_step(model, tx, False)
      steps[f"{label}, update_masks=False"] = (
          lambda fixed=fixed, p=p, state=state: fixed(p, state, x, y))
      update = make_step(model, tx, True)
      updates[label] = lambda update=update, p=p, state=state: update(p, state, x, y)
  fastest = _common.time_side_by_side(steps, repeats, warmup=3, statistic=min)
  update_seconds = _common.time_side_by_side(updates, max(repeats // 5, 3), warmup=1,
                                             statistic=min)
  return {"seconds": fastest, "ratio": {k: v / fastest["adam"] for k, v in fastest.items()},
          "update_seconds": update_seconds}


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.step_overhead",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                      choices=list(MODELS))
  parser.add_argument("--compile-thresholds", action="store_true",
                      help="also time the compile of the step for every threshold method")
  parser.add_argument("--sparse-training", action="store_true",
                      help="time the sparse-training methods instead (rigl, set, static, ste)")
  parser.add_argument("--out", help="JSON path (default: benchmarks/results/step_overhead.json,"
                      " or step_overhead_sparse.json with --sparse-training)")
  args = parser.parse_args(argv)
  args.out = args.out or str(_common.RESULTS / (
      "step_overhead_sparse.json" if args.sparse_training else "step_overhead.json"))
  if args.sparse_training:
    return main_sparse_training(args)
  records = []
  for name in args.models:
    make_model, shape = MODELS[name]
    model = make_model()
    x = jax.random.normal(jax.random.key(0), (args.batch_size,) + shape)
    y = jnp.zeros((x.shape[0],), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    n = sum(p.size for p in jax.tree.leaves(params))
    runs, mask_bytes = {}, {}
    pruning = lambda **kw: optax.chain(optax.adam(1e-3), optax_prune.magnitude_pruning(0.9, **kw))
    for label, tx, update_masks in [
        ("adam", optax.adam(1e-3), None),
        ("bool masks", pruning(), None),
        ("packed masks", pruning(packed_masks=True), None),
        # The non-update step compiled apart: no conditional in it.
        ("static", pruning(packed_masks=True), False),
    ]:
      step = make_step(model, tx, update_masks)
      state = tx.init(params)
      if label != "adam":
        masks = optax_prune.find_pruning_state(state).masks
        mask_bytes[label] = sum(m.nbytes for m in jax.tree.leaves(masks))
      # Step 0 is the one-shot mask update; time the steps after it.
      first = step if update_masks is None else make_step(model, tx, True)
      p, state = first(params, state, x, y)
      runs[label] = lambda step=step, p=p, state=state: step(p, state, x, y)
    compile_seconds = compile_times(model, pruning(packed_masks=True), params, x, y)
    if args.compile_thresholds:
      compile_seconds["adam"] = compile_times(model, optax.adam(1e-3), params, x, y,
                                              modes=(None,))["None"]
      for threshold in _thresholds.THRESHOLDS:
        compile_seconds[f"threshold={threshold}"] = compile_times(
            model, pruning(threshold=threshold), params, x, y, modes=(None,))["None"]
    fastest = _common.time_side_by_side(runs, args.repeats, warmup=3, statistic=min)
    typical = _common.time_side_by_side(runs, args.repeats, warmup=0)
    records.append({
        "model": name, "params": n, "batch_size": args.batch_size,
        "adam_seconds": fastest["adam"],
        "pruned_seconds": fastest["bool masks"],
        "packed_seconds": fastest["packed masks"],
        "static_seconds": fastest["static"],
        "ratio": fastest["bool masks"] / fastest["adam"],
        "packed_ratio": fastest["packed masks"] / fastest["adam"],
        "packed_vs_bool": fastest["packed masks"] / fastest["bool masks"],
        "static_ratio": fastest["static"] / fastest["adam"],
        "static_vs_packed": fastest["static"] / fastest["packed masks"],
        "median_static_ratio": typical["static"] / typical["adam"],
        "median_ratio": typical["bool masks"] / typical["adam"],
        "median_packed_vs_bool": typical["packed masks"] / typical["bool masks"],
        "compile_seconds": compile_seconds,
        "bool_mask_bytes": mask_bytes["bool masks"],
        "packed_mask_bytes": mask_bytes["packed masks"],
    })
  print(_common.table(
      [(r["model"], f"{r['params']:,}", f"{r['adam_seconds'] * 1e3:.3f}",
        f"{r['pruned_seconds'] * 1e3:.3f}", f"{r['packed_seconds'] * 1e3:.3f}",
        f"{r['ratio']:.3f}", f"{r['packed_ratio']:.3f}", f"{r['packed_vs_bool']:.3f}",
        f"{r['static_ratio']:.3f}",
        f"{r['bool_mask_bytes']:,} / {r['packed_mask_bytes']:,}")
       for r in records],
      ("model", "params", "adam ms", "bool ms", "packed ms", "bool / adam",
       "packed / adam", "packed / bool", "static / adam", "mask bytes bool / packed")))
  for r in records:
    c = r["compile_seconds"]
    print(f"compile {r['model']}: one step deciding inside {c['None']:.2f} s;"
          f" without + with the mask update {c['False']:.2f} + {c['True']:.2f} s")
    others = {k: v for k, v in c.items() if k not in ("None", "False", "True")}
    if others:
      print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in others.items()))
  print("\nms: minimum step time over the interleaved repeats; ratios of minima."
        " static: packed masks, the step compiled with update_masks=False.")
  path = _common.pathlib.Path(args.out)
  _common.write_json(path, records, target_ratio=1.03, statistic="min")
  print(f"\nwrote {path}")
  return {"records": records}


def main_sparse_training(args) -> dict:
  records = []
  for name in args.models:
    make_model, shape = MODELS[name]
    model = make_model()
    x = jax.random.normal(jax.random.key(0), (args.batch_size,) + shape)
    y = jnp.zeros((x.shape[0],), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    timed = sparse_training(model, params, x, y, args.repeats)
    records.append({"model": name, "params": sum(p.size for p in jax.tree.leaves(params)),
                    "batch_size": args.batch_size, **timed})
  labels = list(records[0]["seconds"])
  rows = []
  for r in records:
    for label in labels:
      update = r["update_seconds"].get(label)
      rows.append((r["model"], label, f"{r['seconds'][label] * 1e3:.3f}",
                   f"{r['ratio'][label]:.3f}",
                   "-" if update is None else f"{update * 1e3:.2f}"))
  print(_common.table(rows, ("model", "method", "step ms", "step / adam",
                             "mask update step ms")))
  print("\nms: minimum over interleaved repeats of a step that does not update masks"
        " (sparsity 0.9; gradual: after its one-shot update), deciding inside the step"
        " (default) or compiled with update_masks=False; mask update step: the step"
        " compiled with update_masks=True.")
  path = _common.pathlib.Path(args.out)
  _common.write_json(path, records, target_ratio=1.03, statistic="min")
  print(f"\nwrote {path}")
  return {"records": records}


if __name__ == "__main__":
  main()
