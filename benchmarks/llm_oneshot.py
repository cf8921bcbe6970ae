"""One-shot pruning of the character transformer: magnitude, Wanda and
SparseGPT, at 50% unstructured and at 2:4, all at once and sequentially.

Run as ``python -m benchmarks.llm_oneshot``. For each seed the character model
of ``benchmarks.accuracy`` is trained dense; calibration batches are training
windows. The kernels (the default `where`: not the embedding tables, not the biases) are pruned
once, each to the target (uniform), and the validation loss is measured right
after pruning (no fine-tune):

* all at once: statistics (``input_norms`` / ``hessians``) of the dense
  model, then ``prune`` / ``sparsegpt`` on all kernels;
* sequential (``prune_sequential``): the blocks ``Block_0``, ``Block_1`` and
  the head (final LayerNorm + Dense) in order, each calibrated on the outputs
  of the pruned blocks before it. Magnitude needs no data: it is run once.

At 2:4 each kernel is N:M along its last input axis (``head_dim`` for the
attention output kernels ``(heads, head_dim, out)``). Saves
``benchmarks/results/llm_oneshot.json``.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

import optax_prune
from benchmarks import _common
from benchmarks import accuracy
from benchmarks import oneshot

NM = optax_prune.by_path({r"\['out'\]": optax_prune.n_of_m(2, 4, axis=1)},
                         default=optax_prune.n_of_m(2, 4, axis=0))
CONFIGS = {"50%": (0.5, None, "output"), "2:4": (1.0, NM, "leaf")}  # (s, granularity, Wanda's)
HEAD = ("LayerNorm_0", "Dense_0")


def blocks_of(task):
  """The model as ``(params -> sequential params, blocks, inputs, back)``."""
  model = task.model
  block = accuracy.Block(model.heads, model.mlp or 4 * model.width, model.qkv)
  block_fn = lambda p, x: block.apply({"params": p}, x)

  def head_fn(p, x):
    x = nn.LayerNorm().apply({"params": p["LayerNorm_0"]}, x)
    return nn.Dense(model.vocab).apply({"params": p["Dense_0"]}, x)

  def split(params):  # The head's two leaves under one key.
    out = {k: v for k, v in params.items() if k not in HEAD}
    out["head"] = {k: params[k] for k in HEAD}
    return out

  def back(params):
    out = {k: v for k, v in params.items() if k != "head"}
    out.update(params["head"])
    return out

  def inputs(params, tokens):
    return params["Embed_0"]["embedding"][tokens] + params["position"][: tokens.shape[1]]

  blocks = [(f"Block_{i}", block_fn) for i in range(model.depth)] + [("head", head_fn)]
  return split, back, blocks, inputs


def run(seeds: int, epochs: int, calibration: int, blocksize: int) -> list[dict]:
  task = accuracy.make_task("chars")
  fn = lambda p, x: task.model.apply({"params": p}, x)
  split, back, blocks, inputs = blocks_of(task)
  records = []
  for seed in range(seeds):
    rng = np.random.default_rng(seed)
    params = jax.jit(task.model.init)(jax.random.key(seed), task.example())["params"]
    dense = oneshot.train(task, optax.adam(task.learning_rate), params,
                          epochs * task.steps_per_epoch, rng).params
    xs, _ = task.epoch_batches(np.random.default_rng(1000 + seed))
    xs = list(xs[:calibration])
    # The blocks compose to the model.
    h = inputs(dense, xs[0])
    for key, f in blocks:
      h = f(split(dense)[key], h)
    np.testing.assert_allclose(h, fn(dense, xs[0]), rtol=2e-4, atol=2e-4)
    dense_loss = task.evaluate(dense)
    start = time.perf_counter()
    norms = optax_prune.input_norms(fn, dense, xs)
    hessians = optax_prune.hessians(fn, dense, xs)
    stats_s = time.perf_counter() - start
    for name, (sparsity, granularity, compare) in CONFIGS.items():
      for method in ("magnitude", "wanda", "sparsegpt"):
        for order in ("all at once", "sequential"):
          if method == "magnitude" and order == "sequential":
            continue
          start = time.perf_counter()
          if order == "sequential":
            pruned, masks = optax_prune.prune_sequential(
                split(dense), blocks, [inputs(dense, x) for x in xs], sparsity, method=method,
                granularity=granularity, blocksize=blocksize,
                compare=compare if method == "wanda" else None)
            pruned, masks = back(pruned), back(masks)
          elif method == "sparsegpt":
            pruned, masks = optax_prune.sparsegpt(dense, hessians, sparsity,
                                                  granularity=granularity, blocksize=blocksize)
          else:
            extra = dict(input_norms=norms, compare=compare) if method == "wanda" else {}
            pruned, masks = optax_prune.prune(dense, sparsity,
                                              granularity=granularity, distribution="uniform",
                                              **extra)
          jax.block_until_ready(pruned)
          seconds = time.perf_counter() - start
          kept = [np.asarray(m) for m in jax.tree.leaves(masks)]
          records.append({
              "seed": seed, "config": name, "method": method, "order": order,
              "dense_val_loss": dense_loss, "one_shot_val_loss": task.evaluate(pruned),
              "sparsity": float(1 - np.sum([k.sum() for k in kept]) / np.sum([k.size for k in kept])),
              "seconds": seconds, "statistics_seconds": stats_s,
          })
          print(f"seed {seed} {name:4s} {method:9s} {order:11s}"
                f" val loss {records[-1]['one_shot_val_loss']:.3f} ({seconds:.1f} s)", flush=True)
  return records


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.llm_oneshot",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--epochs", type=int, default=8, help="dense training, 50 steps each")
  parser.add_argument("--calibration", type=int, default=8, help="batches of 16 windows")
  parser.add_argument("--blocksize", type=int, default=16, help="SparseGPT's (inputs: 48, 192)")
  parser.add_argument("--out", default=str(_common.RESULTS / "llm_oneshot.json"))
  args = parser.parse_args(argv)
  records = run(args.seeds, args.epochs, args.calibration, args.blocksize)
  rows = []
  for name in CONFIGS:
    for method in ("magnitude", "wanda", "sparsegpt"):
      for order in ("all at once", "sequential"):
        rs = [r for r in records if (r["config"], r["method"], r["order"]) == (name, method, order)]
        if rs:
          loss = [r["one_shot_val_loss"] for r in rs]
          rows.append((name, method, order, f"{np.mean([r['dense_val_loss'] for r in rs]):.3f}",
                       f"{np.mean(loss):.3f} ± {np.std(loss, ddof=1) if len(rs) > 1 else 0:.3f}",
                       f"{np.mean([r['sparsity'] for r in rs]):.3f}"))
  print(_common.table(rows, ("config", "method", "order", "dense", "one-shot val loss",
                             "sparsity")))
  path = _common.pathlib.Path(args.out)
  _common.write_json(path, records, args=vars(args))
  print(f"\nwrote {path}")
  return {"records": records}


if __name__ == "__main__":
  main()
