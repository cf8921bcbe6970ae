"""Bytes of a pruned model in memory and on disk: dense, BCOO, compact, N:M compact.

Run as ``python -m benchmarks.compact_sizes``. Sizes depend only on the masks,
so the digits CNN of the demo is pruned once at init (``magnitude_pruning`` at
each sparsity, or 2:4), as ``benchmarks/export_sizes.py`` does. For each it
measures the bytes in memory and the size of the directory orbax writes for:
the dense pruned params (raw ``nbytes``, and through orbax, which compresses
the zeros), ``to_bcoo`` (in memory, and through orbax as its data + indices
arrays), ``compact`` and, for 2:4, ``compact(..., nm=n_of_m(2, 4, ...))``;
plus the masks' bytes in the optimizer state (bool: one byte per entry;
packed: ``prod(_bits.packed_shape(shape))``). Every compact checkpoint is
loaded back and compared bit for bit. Saves
``benchmarks/results/compact_sizes.json``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import tempfile
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_prune
from benchmarks import _common
from benchmarks import demo_digits
from benchmarks import export_sizes
from benchmarks import structured
from optax_prune import _bits

CONFIGS = {
    "unstructured 0.5": (0.5, None),
    "unstructured 0.75": (0.75, None),
    "unstructured 0.9": (0.9, None),
    "unstructured 0.95": (0.95, None),
    "2:4": (1.0, structured.two_of_four),
}
# 2:4 groups run along axis -2 (the first convolution, 1 input channel, is
# 2:4 along -1 and falls back to the bit layout).
NM = optax_prune.n_of_m(2, 4, axis=-2)


def dir_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def nbytes(tree) -> int:
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def orbax_bytes(tree, path: pathlib.Path, saves: int) -> int:
  """Median directory size over `saves` saves (orbax's file layout varies by
  a few kB from one save to the next)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  sizes = []
  for i in range(saves):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((path / str(i)).absolute(), tree)
    checkpointer.wait_until_finished()
    checkpointer.close()
    sizes.append(dir_bytes(path / str(i)))
  return int(statistics.median(sizes))


def save_compact_bytes(params, masks, pattern, path: pathlib.Path, saves: int) -> int:
  sizes = []
  for i in range(saves):
    optax_prune.save_compact(path / str(i), params, masks, nm=pattern)
    sizes.append(dir_bytes(path / str(i)))
  return int(statistics.median(sizes))


def mask_bytes(masks) -> tuple[int, int]:
  """(bool, packed) bytes of the masks in the optimizer state."""
  leaves = [m for m in jax.tree.leaves(masks) if not isinstance(m, optax.MaskedNode)]
  return (sum(math.prod(m.shape) for m in leaves),
          sum(math.prod(_bits.packed_shape(m.shape)) for m in leaves))


def measure(params, masks, nm: bool, workdir: pathlib.Path, saves: int) -> dict:
  # As users save them: jax.Arrays (the pruning zeroes pruned weights).
  dense = jax.tree.map(
      lambda p, m: p if isinstance(m, optax.MaskedNode) else jnp.where(m, p, 0),
      params, masks, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  bcoo = optax_prune.to_bcoo(params, masks)
  bcoo_arrays = jax.tree.map(lambda x: {"data": x.data, "indices": x.indices}
                             if hasattr(x, "indices") else x, bcoo,
                             is_leaf=lambda x: hasattr(x, "indices"))
  record = {
      "dense_bytes": nbytes(dense),
      "dense_orbax_bytes": orbax_bytes(dense, workdir / "dense", saves),
      "bcoo_bytes": nbytes(bcoo_arrays),
      "bcoo_orbax_bytes": orbax_bytes(bcoo_arrays, workdir / "bcoo", saves),
  }
  record["bool_mask_bytes"], record["packed_mask_bytes"] = mask_bytes(masks)
  variants = {"compact": None, "nm_compact": NM} if nm else {"compact": None}
  for name, pattern in variants.items():
    record[f"{name}_bytes"] = nbytes(optax_prune.compact(params, masks, nm=pattern))
    record[f"{name}_orbax_bytes"] = save_compact_bytes(params, masks, pattern, workdir / name, saves)
    loaded, loaded_masks = optax_prune.load_compact(workdir / name / "0", params)
    exact = all(
        np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(dense)))
    exact &= all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded_masks),
                                                      jax.tree.leaves(masks)))
    record[f"{name}_exact"] = bool(exact)
  record["nm_leaves"] = sum(
      isinstance(x, optax_prune.CompactNMLeaf) for x in jax.tree.leaves(
          optax_prune.compact(params, masks, nm=NM),
          is_leaf=lambda x: isinstance(x, optax_prune.CompactNMLeaf))) if nm else 0
  return record


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.compact_sizes",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS),
                      choices=list(CONFIGS))
  parser.add_argument("--saves", type=int, default=3,
                      help="saves per checkpoint; the median size is reported")
  parser.add_argument("--out", default=str(_common.RESULTS / "compact_sizes.json"))
  args = parser.parse_args(argv)
  x_train = demo_digits.load_digits()[0]
  params = jax.jit(demo_digits.CNN().init)(jax.random.key(0), x_train[:1])["params"]
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, name in enumerate(args.configs):
      sparsity, granularity = CONFIGS[name]
      masks = export_sizes.pruned(params, sparsity, granularity)
      summary = optax_prune.sparsity_summary(params, masks)
      workdir = pathlib.Path(tmp) / str(i)
      workdir.mkdir()
      record = {"config": name, "masked_sparsity": summary.masked_sparsity}
      record.update(measure(params, masks, granularity is not None, workdir, args.saves))
      record["disk_margin"] = 1 - record["compact_orbax_bytes"] / record["dense_orbax_bytes"]
      records.append(record)
  kb = lambda b: f"{b / 1000:,.1f}"
  print(_common.table(
      [(r["config"], f"{r['masked_sparsity']:.3f}", kb(r["dense_bytes"]),
        kb(r["dense_orbax_bytes"]), kb(r["bcoo_bytes"]), kb(r["bcoo_orbax_bytes"]),
        kb(r["compact_bytes"]), kb(r["compact_orbax_bytes"]),
        "-" if "nm_compact_bytes" not in r else kb(r["nm_compact_bytes"]),
        "-" if "nm_compact_bytes" not in r else kb(r["nm_compact_orbax_bytes"]),
        f"{r['disk_margin']:.1%}", kb(r["bool_mask_bytes"]), kb(r["packed_mask_bytes"]))
       for r in records],
      ("config", "kernel sparsity", "dense kB", "dense orbax kB", "BCOO kB",
       "BCOO orbax kB", "compact kB", "compact orbax kB", "N:M compact kB",
       "N:M orbax kB", "disk saved vs dense orbax", "bool masks kB", "packed masks kB")))
  path = pathlib.Path(args.out)
  _common.write_json(path, records, saves=args.saves)
  print(f"\nwrote {path}")
  return {"records": records}


if __name__ == "__main__":
  main()
