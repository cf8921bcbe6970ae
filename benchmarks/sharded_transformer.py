"""A small transformer pruned on an 8-device mesh, matched against one device.

Run as ``python -m benchmarks.sharded_transformer`` (under a minute on 2 CPU
cores). A GPT-style character model learns the Python standard library's own
source (nothing is downloaded), with ``optax.adam`` and ``magnitude_pruning``
chained, twice from the same initialization and the same batches:

* sharded over 8 faked CPU devices, ``--mesh fsdp`` (each large leaf's largest
  axis split over all 8, batches split too) or ``--mesh 2d`` (a
  ``("data", "model")`` = 2 x 4 mesh: kernels split over both axes, batches
  over ``data``); leaves under ``--min-shard-size`` entries stay replicated;
* on one device.

It prints the placement of every leaf, both loss curves, how far they and the
final masks differ, and the sharded run's ``optax_prune.sparsity_summary``;
it exits with status 1 if the runs differ beyond ``--rtol`` (losses) or
``--max-mask-diff`` (fraction of mask entries). Sharded matmuls sum in another
order, so losses agree to float rounding, not bitwise.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # Before JAX starts: faked CPU devices.
  _FLAG = "--xla_force_host_platform_device_count"
  if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import argparse
import glob
import time
from typing import Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_prune
from benchmarks import accuracy

DEVICES = 8


# The character model of the accuracy benchmark, so both measure one model.
CharTransformer = accuracy.CharTransformer


def stdlib_codes() -> np.ndarray:
  """ASCII codes of the standard library's top-level ``*.py`` files."""
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
  text = "".join(open(f, encoding="utf-8").read() for f in files)
  return np.frombuffer(text.encode("ascii", errors="replace"), np.uint8)


def batches(steps: int, batch_size: int, context: int, seed: int) -> np.ndarray:
  """(steps, batch, context + 1) int32 windows of the text, fixed by ``seed``."""
  codes = stdlib_codes()
  starts = np.random.default_rng(seed).integers(
      0, len(codes) - context - 1, (steps, batch_size)
  )
  return codes[starts[..., None] + np.arange(context + 1)].astype(np.int32)


def pruned_leaf(path, leaf) -> bool:
  # Dense and attention kernels: not biases (attention's are 2D), not the
  # token and position tables.
  del leaf
  return jax.tree_util.keystr(path).endswith("['kernel']")


def leaf_spec(shape, mesh_kind: str, min_size: int) -> P:
  """Where a leaf goes: split when large and divisible, else replicated."""
  spec = [None] * len(shape)
  if len(shape) < 2 or int(np.prod(shape)) < min_size:
    return P(*spec)
  if mesh_kind == "fsdp":
    axes = [a for a in range(len(shape)) if shape[a] % DEVICES == 0]
    if axes:
      spec[max(axes, key=lambda a: shape[a])] = "fsdp"  # The largest axis.
    return P(*spec)
  if shape[-1] % 4 == 0:
    spec[-1] = "model"
  axes = [a for a in range(len(shape) - 1) if shape[a] % 2 == 0]
  if axes:
    spec[max(axes, key=lambda a: shape[a])] = "data"
  return P(*spec)


def make_mesh(mesh_kind: str, devices) -> jax.sharding.Mesh:
  if mesh_kind == "fsdp":
    return jax.sharding.Mesh(
        np.array(devices[:DEVICES]), ("fsdp",), axis_types=(AxisType.Auto,)
    )
  return jax.sharding.Mesh(
      np.array(devices[:DEVICES]).reshape(2, 4), ("data", "model"),
      axis_types=(AxisType.Auto,) * 2,
  )


def train(model, tx, params, data, batch_sharding):
  """Losses per step and the final params and optimizer state."""

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      logits = model.apply({"params": p}, batch[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch[:, 1:]
      ).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)  # Masks and moments placed like the params.
  losses = []
  for batch in data:
    params, opt_state, loss = step(
        params, opt_state, jax.device_put(batch, batch_sharding)
    )
    losses.append(loss)
  return np.asarray(jax.device_get(losses)), params, opt_state


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.sharded_transformer",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--mesh", choices=["fsdp", "2d"], default="fsdp")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--batch-size", type=int, default=16,
                      help="divisible by the devices the batch is split over")
  parser.add_argument("--context", type=int, default=32)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--sparsity", type=float, default=0.8)
  parser.add_argument("--scope", choices=["layer", "global"], default="global")
  parser.add_argument("--threshold", choices=["auto", "sort", "bisect"], default="auto")
  parser.add_argument("--min-shard-size", type=int, default=1024,
                      help="leaves with fewer entries stay replicated")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rtol", type=float, default=1e-5,
                      help="largest relative difference of losses accepted")
  parser.add_argument("--max-mask-diff", type=float, default=1e-3,
                      help="largest fraction of differing mask entries accepted")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  devices = jax.devices()
  if len(devices) < DEVICES:
    raise SystemExit(
        f"needs {DEVICES} devices, found {len(devices)}: run as a script (it"
        f" sets XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES})."
    )
  mesh = make_mesh(args.mesh, devices)
  batch_axis = "fsdp" if args.mesh == "fsdp" else "data"
  if args.batch_size % mesh.shape[batch_axis]:
    raise SystemExit(f"--batch-size must be divisible by {mesh.shape[batch_axis]}.")

  model = CharTransformer(context=args.context, width=args.width,
                          depth=args.depth, heads=args.heads)
  host = jax.device_get(model.init(
      jax.random.key(args.seed), np.zeros((1, args.context), np.int32)
  )["params"])
  data = batches(args.steps, args.batch_size, args.context, args.seed)
  # The sparsity rises over the first two thirds of the run, six mask updates.
  end = max(1, 2 * args.steps // 3)
  schedule = optax_prune.polynomial_schedule(
      args.sparsity, begin_step=0, end_step=end, frequency=max(1, end // 6)
  )
  tx = optax.chain(
      optax.adam(args.learning_rate),
      optax_prune.magnitude_pruning(
          schedule, where=pruned_leaf, scope=args.scope, threshold=args.threshold
      ),
  )

  shardings = jax.tree.map(
      lambda x: NamedSharding(mesh, leaf_spec(x.shape, args.mesh, args.min_shard_size)),
      host,
  )
  print(f"mesh {dict(mesh.shape)}; leaf placements:")
  for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]:
    leaf = host
    for key in path:
      leaf = leaf[key.key]
    print(f"  {jax.tree_util.keystr(path):48s} {str(leaf.shape):16s} {sharding.spec}")

  sharded = train(model, tx, jax.device_put(host, shardings), data,
                  NamedSharding(mesh, P(batch_axis)))
  single = train(model, tx, jax.device_put(host, devices[0]), data, devices[0])

  losses, params, opt_state = sharded
  masks = optax_prune.find_pruning_state(opt_state).masks
  one_losses, _, one_state = single
  one_masks = optax_prune.find_pruning_state(one_state).masks
  # (sharded mask, one-device mask, param) per pruned leaf.
  unpruned = lambda x: isinstance(x, optax.MaskedNode)
  triples = [
      t for t in zip(*(jax.tree.flatten(tree, is_leaf=unpruned)[0]
                       for tree in (masks, one_masks, params)))
      if not unpruned(t[0])
  ]
  mask_diff = sum(int((np.asarray(m) != np.asarray(o)).sum()) for m, o, _ in triples)
  mask_size = sum(m.size for m, _, _ in triples)
  loss_rel = float(np.max(np.abs(losses - one_losses) / np.abs(one_losses)))
  placed = all(m.sharding.is_equivalent_to(p.sharding, p.ndim) for m, _, p in triples)

  print("\nstep  loss (8 devices)  loss (1 device)")
  for t in sorted({0, *range(0, args.steps, max(1, args.steps // 10)), args.steps - 1}):
    print(f"{t:4d}  {losses[t]:16.6f}  {one_losses[t]:15.6f}")
  print(f"\nlargest relative loss difference: {loss_rel:.2e} (--rtol {args.rtol:g})")
  print(f"final masks differing: {mask_diff} of {mask_size} entries"
        f" (--max-mask-diff {args.max_mask_diff:g})")
  print(f"masks placed like their params: {placed}")
  print(f"\nsharded run:\n{optax_prune.sparsity_summary(params, masks)}")
  ok = loss_rel <= args.rtol and mask_diff <= args.max_mask_diff * mask_size and placed
  print(f"\n{'match' if ok else 'MISMATCH'} in {time.perf_counter() - start:.1f} s")
  result = {
      "losses": losses.tolist(), "one_device_losses": one_losses.tolist(),
      "loss_rel_diff": loss_rel, "mask_diff": mask_diff, "mask_size": mask_size,
      "masks_placed": placed, "ok": ok,
  }
  if __name__ == "__main__" and not ok:
    raise SystemExit(1)
  return result


if __name__ == "__main__":
  main()
