"""Bytes of a pruned model as dense arrays, BCOO and N:M, and a check of each.

Run as ``python -m benchmarks.export_sizes``. Sizes depend only on the masks'
counts, not on training, so the digits CNN of the demo is pruned once at
init with each configuration: unstructured at 0.5, 0.75 and 0.9, 2:4 along
the input axis, and 4x4 blocks at 0.5 and 0.9. For each it reports the
totals of ``export_size_report`` (float32 weights; kernels pruned, biases
dense) and checks on every kernel that the BCOO matmul, and for 2:4 the
``nm_matmul`` of the packed layout, equal the masked dense matmul. Saves
``benchmarks/results/export_sizes.json``.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Optional, Sequence

import jax
import numpy as np

import optax_prune
from benchmarks import _common
from benchmarks import demo_digits
from benchmarks import structured

CONFIGS = {
    "unstructured 0.5": (0.5, None),
    "unstructured 0.75": (0.75, None),
    "unstructured 0.9": (0.9, None),
    "2:4": (1.0, structured.two_of_four),
    "blocks 4x4 0.5": (0.5, lambda params: optax_prune.blocks((4, 4))),
    "blocks 4x4 0.9": (0.9, lambda params: optax_prune.blocks((4, 4))),
}


def pruned(params, sparsity, granularity):
  tx = optax_prune.magnitude_pruning(
      sparsity, granularity=granularity(params) if granularity else None)
  state = jax.jit(tx.update)(params, tx.init(params), params)[1]
  return state.masks


def check_matmuls(params, masks, nm: bool) -> float:
  """Largest relative error of the sparse matmuls against masked dense ones.

  Each kernel is used as a (fan_in, out) matrix, as its layer multiplies it.
  """
  worst = 0.0
  for path, w in jax.tree_util.tree_leaves_with_path(params):
    if w.ndim < 2:
      continue
    kernel = w.reshape(-1, w.shape[-1])
    mask = _leaf(masks, path).reshape(kernel.shape)
    inputs = jax.random.normal(jax.random.key(0), (8, kernel.shape[0]))
    dense = np.asarray(inputs, np.float64) @ np.where(mask, kernel, 0).astype(np.float64)
    results = [inputs @ optax_prune.to_bcoo({"k": kernel}, {"k": mask})["k"]]
    # The first convolution has 1 input channel, so its 2:4 groups run along
    # the outputs: not a contraction-axis layout that `nm_matmul` takes.
    if nm and w.shape[-2] % 4 == 0:
      results.append(optax_prune.nm_matmul(
          inputs, optax_prune.to_nm(kernel, mask, optax_prune.n_of_m(2, 4, axis=0))))
    for got in results:
      error = np.max(np.abs(np.asarray(got) - dense)) / max(np.max(np.abs(dense)), 1e-30)
      worst = max(worst, float(error))
  return worst


def _leaf(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.export_sizes",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS),
                      choices=list(CONFIGS))
  parser.add_argument("--out", default=str(_common.RESULTS / "export_sizes.json"))
  args = parser.parse_args(argv)
  x_train = demo_digits.load_digits()[0]
  params = jax.jit(demo_digits.CNN().init)(jax.random.key(0), x_train[:1])["params"]
  records = []
  for name in args.configs:
    sparsity, granularity = CONFIGS[name]
    masks = pruned(params, sparsity, granularity)
    nm = granularity is structured.two_of_four
    # 2:4 runs along axis -2 except where the input is too narrow (-1):
    # report N:M sizes on the axis the masks use.
    report = optax_prune.export_size_report(params, masks, nm=optax_prune.n_of_m(2, 4, axis=-2) if nm else None)
    summary = optax_prune.sparsity_summary(params, masks)
    records.append({
        "config": name, "masked_sparsity": summary.masked_sparsity,
        "dense_bytes": report.dense_bytes, "bcoo_bytes": report.bcoo_bytes,
        "nm_bytes": report.nm_bytes,
        "max_relative_matmul_error": check_matmuls(params, masks, nm),
    })
  print(_common.table(
      [(r["config"], f"{r['masked_sparsity']:.3f}", f"{r['dense_bytes']:,}",
        f"{r['bcoo_bytes']:,}", f"{r['bcoo_bytes'] / r['dense_bytes']:.3f}",
        "-" if r["nm_bytes"] is None else f"{r['nm_bytes']:,}",
        "-" if r["nm_bytes"] is None else f"{r['nm_bytes'] / r['dense_bytes']:.3f}",
        f"{r['max_relative_matmul_error']:.1e}") for r in records],
      ("config", "kernel sparsity", "dense B", "BCOO B", "BCOO/dense", "N:M B",
       "N:M/dense", "max rel. matmul error")))
  path = pathlib.Path(args.out)
  _common.write_json(path, records)
  print(f"\nwrote {path}")
  return {"records": records}


if __name__ == "__main__":
  main()
