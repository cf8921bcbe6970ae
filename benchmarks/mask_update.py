"""Cost of one mask update: time and XLA temporary memory, every method.

Run as ``python -m benchmarks.mask_update``. For parameter sets of realistic
layer shapes (transformer blocks: d x 4d, 4d x d, four d x d) at several total
sizes, it times a jitted mask update for each threshold method and scope, side
by side with two yardsticks on the same parameters:

* ``read``: one jitted read pass, ``sum |w|`` (the physical floor);
* ``sort``: ``jnp.sort`` of every leaf's magnitudes.

``auto`` is resolved per group as the transformation resolves it on this
backend (``_thresholds.AUTO_POLICIES``).

It prints time / read and time / sort, fits the exponent of time against size
(1 = linear), reads temporary bytes per parameter from
``jax.jit(...).lower(...).compile().memory_analysis()``, and saves
``benchmarks/results/mask_update.json`` and ``mask_update.png``.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from benchmarks import _common
from optax_prune import _distributions
from optax_prune import _thresholds

SPARSITY = 0.8


def layer_shapes(total: float) -> list[tuple[int, int]]:
  """Transformer-block kernels with about ``total`` entries in all."""
  # One block holds 12 d^2 entries (d x 4d, 4d x d, four d x d).
  blocks = max(1, round(total / (12 * 768**2)))
  d = max(8, int(math.sqrt(total / (12 * blocks))))
  return [(d, 4 * d), (4 * d, d)] * blocks + [(d, d)] * (4 * blocks)


def make_params(shapes, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]


def mask_update_fn(method: str, scope: str, radix_bits: int = _thresholds.RADIX_BITS):
  # "auto" is resolved per group exactly as `magnitude_pruning` does.
  def masks(group, sparsity):
    size = sum(x.size for x in group)
    count = _distributions.prune_count(sparsity, size)
    return _thresholds.keep_masks_for_counts(
        [group], [count], _thresholds.choose_method(method, size),
        radix_bits=radix_bits)[0]

  def update(leaves, sparsity):
    if scope == "global":
      return masks(leaves, sparsity)
    return [masks([x], sparsity)[0] for x in leaves]
  return jax.jit(update)


def temp_bytes(fn, *args) -> int:
  stats = fn.lower(*args).compile().memory_analysis()
  return int(stats.temp_size_in_bytes) if stats is not None else -1


def single_leaf_shape(total: float) -> list[tuple[int, int]]:
  """One (n / 64, 64) leaf: where the methods cross, by group size."""
  return [(max(1, round(total / 64)), 64)]


def run(sizes, methods, scopes, repeats, radix_bits=_thresholds.RADIX_BITS,
        shapes_for=layer_shapes):
  records = []
  read = jax.jit(lambda leaves: sum(jnp.sum(jnp.abs(x)) for x in leaves))
  sort = jax.jit(lambda leaves: [jnp.sort(jnp.abs(x).reshape(-1)) for x in leaves])
  sparsity = jnp.float32(SPARSITY)
  configs = [(m, s) for s in scopes for m in methods]
  for size in tqdm(sizes, desc="sizes"):
    shapes = shapes_for(size)
    leaves = make_params(shapes)
    n = sum(x.size for x in leaves)
    fns = {"read": lambda: read(leaves), "sort": lambda: sort(leaves)}
    jitted = {}
    for method, scope in configs:
      jitted[(method, scope)] = mask_update_fn(method, scope, radix_bits)
      fns[f"{method}/{scope}"] = (
          lambda f=jitted[(method, scope)]: f(leaves, sparsity))
    times = _common.time_side_by_side(fns, repeats)
    for (method, scope), fn in jitted.items():
      seconds = times[f"{method}/{scope}"]
      records.append({
          "method": method, "scope": scope, "params": n, "leaves": len(shapes),
          "seconds": seconds,
          "read_seconds": times["read"], "sort_seconds": times["sort"],
          "over_read": seconds / times["read"],
          "over_sort": seconds / times["sort"],
          "temp_bytes": temp_bytes(fn, leaves, sparsity),
          "temp_bytes_per_param": temp_bytes(fn, leaves, sparsity) / n,
      })
    for name in ("read", "sort"):
      f = read if name == "read" else sort
      records.append({
          "method": f"yardstick:{name}", "scope": "-", "params": n,
          "leaves": len(shapes), "seconds": times[name],
          "temp_bytes_per_param": temp_bytes(f, leaves) / n,
      })
  return records


def fitted_exponents(records) -> dict[str, float]:
  """Slope of log(seconds) against log(params) per method/scope."""
  out = {}
  for key in sorted({(r["method"], r["scope"]) for r in records}):
    rs = [r for r in records if (r["method"], r["scope"]) == key]
    if len(rs) >= 2:
      x = np.log([r["params"] for r in rs])
      y = np.log([r["seconds"] for r in rs])
      out["/".join(key)] = float(np.polyfit(x, y, 1)[0])
  return out


def plot(records, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
  for key in sorted({(r["method"], r["scope"]) for r in records}):
    rs = sorted((r for r in records if (r["method"], r["scope"]) == key),
                key=lambda r: r["params"])
    label = key[0] if key[1] == "-" else "/".join(key)
    style = "k--" if key[0] == "yardstick:read" else (
        "k:" if key[0] == "yardstick:sort" else "o-")
    ax_t.loglog([r["params"] for r in rs], [r["seconds"] for r in rs], style,
                label=label)
    ax_m.semilogx([r["params"] for r in rs],
                  [r["temp_bytes_per_param"] for r in rs], style, label=label)
  ax_t.set(xlabel="parameters", ylabel="seconds per mask update",
           title="Mask update time (read pass = floor)")
  ax_m.set(xlabel="parameters", ylabel="XLA temp bytes per parameter",
           title="Mask update temporary memory")
  for ax in (ax_t, ax_m):
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.mask_update",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=float, nargs="+",
                      default=[1e5, 1e6, 1e7, 3e7])
  parser.add_argument("--methods", nargs="+",
                      default=["sort", "bisect", "histogram", "auto"],
                      choices=["sort", "bisect", "histogram", "auto"])
  parser.add_argument("--scopes", nargs="+", default=["layer", "global"],
                      choices=["layer", "global"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--single-leaf", action="store_true",
                      help="one (size / 64, 64) leaf per size instead of transformer"
                      " blocks: the crossovers behind threshold='auto'")
  parser.add_argument("--radix-bits", type=int, default=None,
                      help="bits per round of the bisect method's radix search"
                      " (an experiment knob; default: the library's choice)")
  parser.add_argument("--out", default=str(_common.RESULTS / "mask_update.json"))
  parser.add_argument("--plot", default=str(_common.RESULTS / "mask_update.png"))
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  radix_bits = args.radix_bits or _thresholds.RADIX_BITS
  records = run(args.sizes, args.methods, args.scopes, args.repeats, radix_bits,
                single_leaf_shape if args.single_leaf else layer_shapes)
  for r in records:
    r["radix_bits"] = args.radix_bits
  exponents = fitted_exponents([r for r in records if r["scope"] != "-"]
                               + [r for r in records if r["scope"] == "-"])
  rows = [
      (r["method"], r["scope"], f"{r['params']:.2e}", f"{r['seconds'] * 1e3:.2f}",
       f"{r.get('over_read', float('nan')):.1f}",
       f"{r.get('over_sort', float('nan')):.3f}",
       f"{r['temp_bytes_per_param']:.2f}")
      for r in records
  ]
  print(_common.table(rows, ("method", "scope", "params", "ms", "x read",
                             "x sort", "temp B/param")))
  print("\nfitted exponent of time against size (1 = linear):")
  for key, value in exponents.items():
    print(f"  {key:24s} {value:.2f}")
  path = _common.pathlib.Path(args.out)
  _common.write_json(path, records, sparsity=SPARSITY, exponents=exponents)
  plot(records, _common.pathlib.Path(args.plot))
  print(f"\nwrote {path} and {args.plot}")
  return {"records": records, "exponents": exponents}


if __name__ == "__main__":
  main()
