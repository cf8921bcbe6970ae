"""A ResNet-50 whose widths are literals, pruned one-shot, shrunk: CPU speed.

Run as ``python -m benchmarks.shrink_resnet50`` (224x224x3 inputs, batch 8,
1000 classes, ``--repeats`` timed passes) or with ``--quick`` (32x32 inputs,
batch 2, 2 repeats, and ``TinyResNet``, the same code at two stages of one
block and an eighth of the widths: each ``prune`` call compiles its mask
update, 17-70 s for ResNet-50 on a shared 2-core CPU, 5-7 s for this one).
The model is a flax linen
ResNet-50 (bottleneck blocks, BatchNorm in inference mode, projection
shortcuts, stages of 3/4/6/3 blocks) whose widths, 64 to 2048, are numbers
written inside ``__call__``: nothing but the traced jaxpr knows them, so only
``Shrunk.apply`` can run it at the new widths. Randomly initialised; one
training-mode pass over the measured batch (Gaussian noise) sets every
BatchNorm's running statistics to that batch's (momentum 0), so each layer's activations are normalised as in a
trained network. This measures speed, not accuracy.

For each fraction (0.25, 0.5, 0.75 by default) of the channels of every
group ``channel_groups`` finds prunable:
``prune(params, fraction, granularity=coupled_channels(groups.prunable))``
(weight-norm importance), then ``shrink(groups, pruned, state)``, whose
``apply`` is the smaller model; ``shrink`` checks it against the masked model
on the example input (``max_abs_diff``).

Reports parameters, FLOPs of the jitted forward pass (XLA's
``cost_analysis()``, and a count of the convolutions' and the Dense layer's
multiply-adds from the jaxpr, x2), the CPU time of one jitted forward pass of
the dense model and of each shrunk one (interleaved: dense, 0.25, 0.5, 0.75,
dense, ...; the minimum over ``--repeats``), and the wall time of
``channel_groups``, of each ``prune`` and of each ``shrink`` (its check, two
compiles and runs at full size, included).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import optax_prune
from benchmarks import _common

FRACTIONS = (0.25, 0.5, 0.75)
REPEATS = 30


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 convolutions, a projection where the shape changes."""

  @nn.compact
  def __call__(self, x, width, out, strides, train):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.0)
    y = nn.relu(norm()(nn.Conv(width, (1, 1), use_bias=False)(x)))
    y = nn.relu(norm()(nn.Conv(width, (3, 3), strides, use_bias=False)(y)))
    y = norm()(nn.Conv(out, (1, 1), use_bias=False)(y))
    if x.shape[-1] != out or strides != 1:
      x = norm()(nn.Conv(out, (1, 1), strides, use_bias=False)(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """ResNet-50 with its widths written out: no attribute sets them."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(64, (7, 7), 2, padding=[(3, 3), (3, 3)], use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.0)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, (width, out, blocks) in enumerate(
        ((64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3))):
      for block in range(blocks):
        x = Bottleneck()(x, width, out, 2 if block == 0 and stage else 1, train)
    return nn.Dense(1000)(jnp.mean(x, axis=(1, 2)))


class TinyResNet(nn.Module):
  """``--quick``'s model: ResNet-50's code at two stages of one block, widths / 8."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (7, 7), 2, padding=[(3, 3), (3, 3)], use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.0)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, (width, out) in enumerate(((8, 32), (16, 64))):
      x = Bottleneck()(x, width, out, 2 if stage else 1, train)
    return nn.Dense(1000)(jnp.mean(x, axis=(1, 2)))


def count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def jaxpr_flops(fn, *args) -> int:
  """2 x the multiply-adds of every convolution and dot_general ``fn`` runs."""
  total = 0

  def visit(jaxpr):
    nonlocal total
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "conv_general_dilated":
        lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
        out = eqn.outvars[0].aval.shape
        dims = eqn.params["dimension_numbers"]
        # Multiply-adds per output element: the kernel's spatial size x in-features per group.
        spatial = math.prod(rhs[d] for d in dims.rhs_spec[2:])
        total += 2 * math.prod(out) * spatial * rhs[dims.rhs_spec[1]]
      elif name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
      for value in eqn.params.values():  # pjit, custom_jvp_call, ...: their bodies.
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return total


def xla_flops(compiled) -> float:
  """``cost_analysis()['flops']`` of a compiled function (NaN if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return float("nan")
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  start = time.perf_counter()
  size, batch = (32, 2) if args.quick else (args.size, args.batch)
  model = TinyResNet() if args.quick else ResNet50()
  x = jax.random.normal(jax.random.key(args.seed + 1), (batch, size, size, 3))
  variables = jax.jit(model.init)(jax.random.key(args.seed), x)
  params = variables["params"]
  # One training-mode pass over the measured batch with momentum 0 sets the running
  # statistics to its own: every layer's activations normalised, as in a trained model.
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  state = {"batch_stats": updates["batch_stats"]}
  fn = lambda p, s, x: model.apply({"params": p, **s}, x)

  began = time.perf_counter()
  groups = optax_prune.channel_groups(fn, params, x, state=state)
  groups_s = time.perf_counter() - began
  prunable = list(groups.prunable)
  print(f"{len(prunable)} prunable groups of {len(groups.groups)}"
        f" ({sum(g.size for g in prunable):,} channels); found in {groups_s:.1f} s")

  models = {"dense": (jax.jit(fn), params, state)}
  records = [{"model": "dense", "fraction": 0.0, "params": count(params),
              "state": count(state)}]
  for fraction in args.fractions:
    began = time.perf_counter()
    granularity = optax_prune.coupled_channels(prunable)
    pruned, _ = optax_prune.prune(params, fraction, granularity=granularity)
    pruned = _common.block(pruned)
    prune_s = time.perf_counter() - began
    began = time.perf_counter()  # Again: the mask update is compiled, only run.
    _common.block(optax_prune.prune(params, fraction, granularity=granularity)[0])
    prune_again_s = time.perf_counter() - began
    began = time.perf_counter()
    small = optax_prune.shrink(groups, pruned, state)
    small = small._replace(params=_common.block(small.params))
    shrink_s = time.perf_counter() - began
    models[fraction] = (jax.jit(small.apply), small.params, small.state)
    kept = {g.name: small.sizes[g.name] for g in prunable}
    records.append({"model": f"s{round(100 * fraction)}", "fraction": fraction,
                    "params": count(small.params), "state": count(small.state),
                    "max_abs_diff": small.max_abs_diff, "prune_s": prune_s,
                    "prune_again_s": prune_again_s,
                    "shrink_s": shrink_s, "sizes": kept})
    print(f"{fraction:g}: prune {prune_s:.1f} s ({prune_again_s:.2f} s again), shrink {shrink_s:.1f} s,"
          f" max |diff| {small.max_abs_diff:.2g}")

  compiled = {}
  for record, (key, (f, p, s)) in zip(records, models.items()):
    compiled[key] = f.lower(p, s, x).compile()  # `shrink`'s check compiled it: cached.
    record.update(xla_flops=xla_flops(compiled[key]), flops=jaxpr_flops(f, p, s, x))
  out = {key: c(*models[key][1:], x) for key, c in compiled.items()}
  for record, key in zip(records, compiled):
    record["output_max_abs"] = float(jnp.max(jnp.abs(out[key])))
    record["finite"] = bool(jnp.all(jnp.isfinite(out[key])))

  # Interleaved: every model sees the same drift of the shared machine.
  times = {key: [] for key in compiled}
  for key, c in compiled.items():  # Warm-up.
    _common.block(c(*models[key][1:], x))
  for _ in tqdm(range(args.repeats), unit="round", desc="forward passes"):
    for key, c in compiled.items():
      began = time.perf_counter()
      _common.block(c(*models[key][1:], x))
      times[key].append(time.perf_counter() - began)
  dense = records[0]
  for record, key in zip(records, compiled):
    record.update(forward_s=min(times[key]), forward_median_s=float(np.median(times[key])),
                  forward_all_s=times[key], speedup=min(times["dense"]) / min(times[key]),
                  of_dense_params=record["params"] / dense["params"],
                  of_dense_flops=record["flops"] / dense["flops"])
  total = time.perf_counter() - start
  header = {"command": " ".join(["python -m benchmarks.shrink_resnet50", *argv]),
            "model": type(model).__name__, "input_shape": [batch, size, size, 3], "fractions": list(args.fractions),
            "repeats": args.repeats, "seed": args.seed, "channel_groups_s": groups_s,
            "groups": len(groups.groups), "prunable_groups": len(prunable),
            "prunable_channels": sum(g.size for g in prunable),
            "refused": sorted({g.reason for g in groups.groups if not g.prunable}),
            "total_wall_s": total}
  _common.write_json(args.out, records, **header)
  print()
  print(f"{type(model).__name__} (widths literal), input {batch}x{size}x{size}x3, coupled channels pruned"
        f" one-shot and shrunk; CPU forward pass, min of {args.repeats} interleaved repeats;"
        f" channel_groups {groups_s:.1f} s")
  print(table(records))
  print(f"\nwrote {args.out} ({total:.0f} s)")
  return {"header": header, "records": records}


def table(records: Sequence[dict]) -> str:
  rows = []
  for r in records:
    rows.append((f"{r['fraction']:g}", f"{r['params']:,} ({r['of_dense_params']:.3f})",
                 f"{r['flops'] / 1e9:.2f} ({r['of_dense_flops']:.3f})",
                 f"{r['xla_flops'] / 1e9:.2f}", f"{1e3 * r['forward_s']:.1f}",
                 f"{r['speedup']:.2f}",
                 f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-",
                 f"{r['prune_s']:.1f}" if "prune_s" in r else "-",
                 f"{r['shrink_s']:.1f}" if "shrink_s" in r else "-"))
  return _common.table(rows, ("removed", "params (of dense)", "GFLOPs (of dense)",
                              "XLA GFLOPs", "forward ms", "speedup", "max |diff|",
                              "prune s", "shrink s"))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.shrink_resnet50",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="TinyResNet, 32x32 inputs, batch 2, 2 repeats (the smoke test)")
  parser.add_argument("--size", type=int, default=224, help="input height and width")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--fractions", type=lambda s: tuple(float(f) for f in s.split(",")),
                      default=FRACTIONS, help="comma-separated shares of channels removed")
  parser.add_argument("--repeats", type=int, help=f"timed passes per model (default {REPEATS})")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path,
                      default=_common.RESULTS / "shrink_resnet50.json")
  args = parser.parse_args(argv)
  if bad := [f for f in args.fractions if not 0.0 < f < 1.0]:
    parser.error(f"--fractions must be in (0, 1); got {bad}.")
  args.repeats = args.repeats or (2 if args.quick else REPEATS)
  return args


if __name__ == "__main__":
  main()
