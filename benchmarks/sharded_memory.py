"""Per-device temporary memory of a mask update on a mesh of 8 devices.

Run as ``python -m benchmarks.sharded_memory``. For transformer-block kernels
(d x 4d, 4d x d, four d x d; ``--size`` entries in all) placed on 8 faked CPU
devices four ways:

* ``one device``: no mesh, the unsharded yardstick;
* ``replicated``: every device holds every kernel;
* ``fsdp 8``: each kernel's largest axis split over all 8 devices;
* ``2d 2x4``: each kernel split over a ``("data", "model")`` mesh,

it compiles the update of ``magnitude_pruning`` on a mask-update step for each
threshold method and scope, and reads XLA's per-device memory analysis
(``jax.jit(f).lower(...).compile().memory_analysis()``): temporaries, and
the all-gathers in the compiled HLO. Nothing is executed, so large sizes cost
only compile time. Prints a table and saves
``benchmarks/results/sharded_memory.json``.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # Before JAX starts: faked CPU devices.
  _FLAG = "--xla_force_host_platform_device_count"
  if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import argparse
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_prune
from benchmarks import _common

SPARSITY = 0.8
DEVICES = 8
PLACEMENTS = ("one device", "replicated", "fsdp 8", "2d 2x4")


def layer_shapes(total: float) -> list[tuple[int, int]]:
  """One transformer block's kernels, about ``total`` entries, d a multiple of 8."""
  d = max(8, 8 * round(math.sqrt(total / 12) / 8))
  return [(d, 4 * d), (4 * d, d)] + [(d, d)] * 4


def placement_shardings(placement: str, shapes, devices):
  """One sharding per kernel, and one for scalars."""
  kind = (AxisType.Auto,)
  if placement == "one device":
    mesh = jax.sharding.Mesh(np.array(devices[:1]), ("x",), axis_types=kind)
    return [NamedSharding(mesh, P())] * len(shapes), NamedSharding(mesh, P())
  if placement == "2d 2x4":
    mesh = jax.sharding.Mesh(
        np.array(devices[:DEVICES]).reshape(2, 4), ("data", "model"), axis_types=kind * 2
    )
    return [NamedSharding(mesh, P("data", "model"))] * len(shapes), NamedSharding(mesh, P())
  mesh = jax.sharding.Mesh(np.array(devices[:DEVICES]), ("fsdp",), axis_types=kind)
  if placement == "replicated":
    return [NamedSharding(mesh, P())] * len(shapes), NamedSharding(mesh, P())
  specs = [P("fsdp", None) if s[0] >= s[1] else P(None, "fsdp") for s in shapes]
  return [NamedSharding(mesh, s) for s in specs], NamedSharding(mesh, P())


def compiled_update(shapes, shardings, scalar, method: str, scope: str):
  """The pruning update on a mask-update step, compiled for these placements."""
  tx = optax_prune.magnitude_pruning(SPARSITY, scope=scope, threshold=method)
  names = [f"w{i}" for i in range(len(shapes))]
  params = {
      n: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh)
      for n, s, sh in zip(names, shapes, shardings)
  }
  # The state as `init` places it: masks like their params, scalars replicated.
  state = jax.eval_shape(tx.init, params)
  state = state._replace(
      count=jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar),
      masks={n: jax.ShapeDtypeStruct(p.shape, jnp.bool_, sharding=p.sharding)
             for n, p in params.items()},
      target_sparsity=jax.ShapeDtypeStruct((len(names),), jnp.float32, sharding=scalar),
      pruned_units=jax.ShapeDtypeStruct((len(names),), jnp.int32, sharding=scalar),
  )
  shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  update = jax.jit(
      lambda params, state: tx.update(params, state, params),
      # Outputs placed like inputs, as a training step pins them.
      out_shardings=(shardings_of(params), shardings_of(state)),
  )
  return update.lower(params, state).compile()


def run(size: float, methods, scopes, placements) -> list[dict]:
  devices = jax.devices()
  if len(devices) < DEVICES:
    raise SystemExit(
        f"needs {DEVICES} devices, found {len(devices)}: run as a script (it"
        f" sets XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES})."
    )
  shapes = layer_shapes(size)
  n = sum(a * b for a, b in shapes)
  records = []
  for placement in placements:
    shardings, scalar = placement_shardings(placement, shapes, devices)
    per_device = sum(
        math.prod(sh.shard_shape(s)) for s, sh in zip(shapes, shardings)
    )
    for scope in scopes:
      for method in methods:
        record = {
            "placement": placement, "method": method, "scope": scope,
            "params": n, "params_per_device": per_device,
        }
        try:
          compiled = compiled_update(shapes, shardings, scalar, method, scope)
        except Exception as e:  # pylint: disable=broad-except
          record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
          records.append(record)
          continue
        stats = compiled.memory_analysis()
        hlo = compiled.as_text()
        record.update(
            temp_bytes=int(stats.temp_size_in_bytes),
            argument_bytes=int(stats.argument_size_in_bytes),
            output_bytes=int(stats.output_size_in_bytes),
            temp_bytes_per_local_param=stats.temp_size_in_bytes / per_device,
            all_gathers=hlo.count(" all-gather(") + hlo.count(" all-gather-start("),
        )
        records.append(record)
  return records


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.sharded_memory",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=float, default=4e6,
                      help="entries in all kernels (default 4e6, 16 MB of float32)")
  parser.add_argument("--methods", nargs="+", default=["sort", "bisect", "histogram", "auto"],
                      choices=["sort", "bisect", "histogram", "auto"])
  parser.add_argument("--scopes", nargs="+", default=["layer", "global"],
                      choices=["layer", "global"])
  parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS),
                      choices=PLACEMENTS)
  parser.add_argument("--out", default=str(_common.RESULTS / "sharded_memory.json"))
  args = parser.parse_args(argv)
  records = run(args.size, args.methods, args.scopes, args.placements)
  mib = lambda b: f"{b / 2**20:.2f}"
  rows = [
      (r["placement"], r["method"], r["scope"], mib(4 * r["params_per_device"]))
      + (("error", "-", "-", r["error"][:60]) if "error" in r else (
          mib(r["temp_bytes"]), f"{r['temp_bytes_per_local_param']:.2f}",
          str(r["all_gathers"]), ""))
      for r in records
  ]
  print(_common.table(rows, ("placement", "method", "scope", "params MiB/dev",
                             "temp MiB/dev", "temp B/param", "all-gathers", "")))
  path = _common.pathlib.Path(args.out)
  _common.write_json(path, records, sparsity=SPARSITY, shapes=layer_shapes(args.size))
  print(f"\nwrote {path}")
  return records


if __name__ == "__main__":
  main()
