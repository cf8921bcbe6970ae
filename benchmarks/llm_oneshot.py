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
attention output kernels ``(heads, head_dim, out)``). Each loss is also given
as perplexity (``exp`` of the loss in nats per character).

Each pruning call (statistics included for all at once) is run twice: the
seconds of the first (compile included) and of the second, with the JAX
compile seconds inside it and the peak rise of the RSS during it (sampled every
10 ms), and the bytes of statistics and activations each order holds.

Memory against depth: SparseGPT on stacks of 2, 4 and 8 identical MLP blocks,
``prune_sequential`` against ``hessians`` of the whole model then
``sparsegpt``: peak RSS rise and peak of what Python and NumPy allocate
(``tracemalloc``; the Hessians are summed there, in float64).

Saves ``benchmarks/results/llm_oneshot.json``. ``--quick``: the smoke test's
tiny run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import threading
import time
import tracemalloc
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
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


METHODS = ("magnitude", "wanda", "sparsegpt")
ORDERS = ("all at once", "sequential")
# The smoke test's run: compile is most of it, so one config and each call once.
QUICK = dict(seeds=1, steps=20, calibration=2, configs="50%", once=True, depths="2",
             depth_width=32)


class PeakRSS:
  """The peak rise of the process's resident memory over a ``with`` block,
  sampled every ``interval`` seconds in a thread (spikes shorter than that
  can be missed). Call :func:`return_freed_memory` first so that freed
  buffers leave the RSS instead of staying in malloc's heap."""

  def __init__(self, interval: float = 0.01):
    self.interval, self.rise = interval, 0

  @staticmethod
  def rss() -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

  def _sample(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.rss())
      self._stop.wait(self.interval)

  def __enter__(self):
    self.start = self.peak = self.rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.rss())
    self.rise = self.peak - self.start


def return_freed_memory() -> None:
  """glibc: allocations of 64 KiB and more are mmap'd (the threshold no longer
  grows), so buffers freed go back to the OS and the RSS follows live memory."""
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return
  libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
  libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
  libc.malloc_trim(0)


_COMPILE = [0.0]


def _on_event(name, seconds, **_):
  if name.startswith("/jax/core/compile/"):
    _COMPILE[0] += seconds


def compile_seconds() -> float:
  """Seconds JAX spent tracing, lowering and compiling, so far."""
  if not getattr(compile_seconds, "registered", False):
    jax.monitoring.register_event_duration_secs_listener(_on_event)
    compile_seconds.registered = True
  return _COMPILE[0]


def measured(call, trace: bool = False, once: bool = False):
  """``call()`` twice: ``(result, first seconds, warm seconds, compile seconds
  of the warm call, peak RSS rise of the warm call in bytes)``. The warm call
  reuses what the first compiled, except for the statistics (``input_norms``
  and ``hessians`` trace and compile their collection on every call).
  ``once``: a single call, measured as both."""
  first = None
  if not once:
    start = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - start
  gc.collect()
  return_freed_memory()
  compiled = compile_seconds()
  if trace:  # The peak of what Python and NumPy allocate (the host statistics), not XLA's buffers.
    tracemalloc.start()
  with PeakRSS() as peak:
    start = time.perf_counter()
    result = jax.block_until_ready(call())
    warm = time.perf_counter() - start
  first = warm if first is None else first
  if trace:
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, first, warm, compile_seconds() - compiled, peak.rise, traced
  return result, first, warm, compile_seconds() - compiled, peak.rise


def nbytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def run(seeds: int, epochs: int, calibration: int, blocksize: int,
        steps: Optional[int] = None, configs: Sequence[str] = tuple(CONFIGS),
        once: bool = False) -> list[dict]:
  task = accuracy.make_task("chars")
  fn = lambda p, x: task.model.apply({"params": p}, x)
  split, back, blocks, inputs = blocks_of(task)
  compile_seconds()
  records = []
  for seed in range(seeds):
    rng = np.random.default_rng(seed)
    params = jax.jit(task.model.init)(jax.random.key(seed), task.example())["params"]
    dense = oneshot.train(task, optax.adam(task.learning_rate), params,
                          steps if steps is not None else epochs * task.steps_per_epoch,
                          rng).params
    xs, _ = task.epoch_batches(np.random.default_rng(1000 + seed))
    xs = list(xs[:calibration])
    # The blocks compose to the model.
    h = inputs(dense, xs[0])
    for key, f in blocks:
      h = f(split(dense)[key], h)
    np.testing.assert_allclose(h, fn(dense, xs[0]), rtol=2e-4, atol=2e-4)
    dense_loss = task.evaluate(dense)
    activations = [inputs(dense, x) for x in xs]
    # What each order holds at once: all at once, every kernel's statistics;
    # sequential, one block's and the block's inputs and outputs.
    hessians = optax_prune.hessians(fn, dense, xs)
    norms = optax_prune.input_norms(fn, dense, xs)
    prefix = lambda key: tuple(f"['{k}']" for k in (HEAD if key == "head" else (key,)))
    per_block = lambda stats: max(
        nbytes({k: v for k, v in stats.items() if k.startswith(prefix(key))}) for key, _ in blocks)
    held = {("wanda", "all at once"): nbytes(norms), ("sparsegpt", "all at once"): nbytes(hessians),
            ("wanda", "sequential"): per_block(norms) + 2 * nbytes(activations),
            ("sparsegpt", "sequential"): per_block(hessians) + 2 * nbytes(activations)}
    for name in configs:
      sparsity, granularity, compare = CONFIGS[name]
      for method in METHODS:
        for order in ORDERS:
          if method == "magnitude" and order == "sequential":
            continue
          if order == "sequential":
            call = lambda: optax_prune.prune_sequential(
                split(dense), blocks, activations, sparsity, method=method,
                granularity=granularity, blocksize=blocksize,
                compare=compare if method == "wanda" else None)
          elif method == "sparsegpt":  # Calibration included: the statistics, then pruning.
            call = lambda: optax_prune.sparsegpt(dense, optax_prune.hessians(fn, dense, xs),
                                                 sparsity, granularity=granularity,
                                                 blocksize=blocksize)
          elif method == "wanda":
            call = lambda: optax_prune.prune(dense, sparsity, granularity=granularity,
                                             distribution="uniform", compare=compare,
                                             input_norms=optax_prune.input_norms(fn, dense, xs))
          else:
            call = lambda: optax_prune.prune(dense, sparsity, granularity=granularity,
                                             distribution="uniform")
          (pruned, masks), first, warm, compiling, rise = measured(call, once=once)
          if order == "sequential":
            pruned, masks = back(pruned), back(masks)
          kept = [np.asarray(m) for m in jax.tree.leaves(masks)]
          loss = task.evaluate(pruned)
          records.append({
              "seed": seed, "config": name, "method": method, "order": order,
              "dense_val_loss": dense_loss, "one_shot_val_loss": loss,
              "dense_perplexity": float(np.exp(dense_loss)),
              "one_shot_perplexity": float(np.exp(loss)),
              "sparsity": float(1 - np.sum([k.sum() for k in kept]) / np.sum([k.size for k in kept])),
              "seconds_first": first, "seconds": warm, "compile_seconds": compiling,
              "rss_rise_bytes": int(rise), "held_bytes": held.get((method, order), 0),
          })
          print(f"seed {seed} {name:4s} {method:9s} {order:11s} val loss {loss:.3f}"
                f" ({first:.2f} s first, {warm:.2f} s warm of which {compiling:.2f} s compile,"
                f" RSS +{rise / 2**20:.1f} MiB)", flush=True)
  return records


# ------------------------------------------------- memory against depth --


def depth_memory(depths: Sequence[int], width: int, batches: int = 4, rows: int = 256,
                 blocksize: int = 128, once: bool = False) -> list[dict]:
  """SparseGPT on a stack of ``L`` identical residual MLP blocks
  (``x + relu(x W1) W2``, ``W1: (width, 4 width)``): the peak RSS rise of
  ``prune_sequential`` against all at once (``hessians`` of the whole model,
  then ``sparsegpt``), each the second of two calls, with the bytes of the
  Hessians returned (float32; summed in float64, twice that, while collected)."""
  block_fn = lambda p, x: x + jax.nn.relu(x @ p["w1"]) @ p["w2"]
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.standard_normal((rows, width), np.float32)) for _ in range(batches)]
  records = []
  for depth in depths:
    params = {f"layer_{i}": {  # On the device once: no copies in the calls.
        "w1": (rng.standard_normal((width, 4 * width)) / np.sqrt(width)).astype(np.float32),
        "w2": (rng.standard_normal((4 * width, width)) / np.sqrt(8 * width)).astype(np.float32)}
        for i in range(depth)}
    params = jax.tree.map(jnp.asarray, params)
    blocks = [(f"layer_{i}", block_fn) for i in range(depth)]

    def model(p, x):
      for key, f in blocks:
        x = f(p[key], x)
      return x

    calls = {
        "sequential": lambda: optax_prune.prune_sequential(params, blocks, xs, 0.5,
                                                           blocksize=blocksize),
        "all at once": lambda: optax_prune.sparsegpt(
            params, optax_prune.hessians(model, params, xs), 0.5, blocksize=blocksize),
    }
    hessian_bytes = nbytes(optax_prune.hessians(model, params, xs))
    for order, call in calls.items():
      _, first, warm, _, rise, traced = measured(call, trace=True, once=once)
      records.append({"depth": depth, "width": width, "order": order,
                      "rss_rise_bytes": int(rise), "traced_peak_bytes": int(traced),
                      "seconds": warm,
                      "hessian_bytes": hessian_bytes // depth if order == "sequential"
                      else hessian_bytes,
                      "params_bytes": nbytes(params), "calibration_bytes": nbytes(xs)})
      print(f"depth {depth} {order:11s} RSS +{rise / 2**20:.1f} MiB,"
            f" Python/NumPy peak {traced / 2**20:.1f} MiB"
            f" (Hessians held {records[-1]['hessian_bytes'] / 2**20:.1f} MiB, {warm:.2f} s)",
            flush=True)
  return records


def _mean_std(values) -> str:
  return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"


def tables(records: list[dict]) -> str:
  """Papers' layout: a row per method (and order), columns dense, 50%, 2:4."""
  configs = [c for c in CONFIGS if any(r["config"] == c for r in records)]
  out = []
  for metric, label in (("val_loss", "val loss (nats/char)"), ("perplexity", "perplexity")):
    rows = []
    for method in METHODS:
      for order in ORDERS:
        cells = []
        for name in configs:
          rs = [r for r in records if (r["config"], r["method"], r["order"]) == (name, method, order)]
          cells.append(_mean_std([r[f"one_shot_{metric}"] for r in rs]) if rs else None)
        if any(cells):
          dense = {r["seed"]: r[f"dense_{metric}"] for r in records}
          rows.append((method, order, _mean_std(list(dense.values())), *cells))
    out.append(label + "\n" + _common.table(rows, ("method", "order", "dense", *configs)))
  rows = []
  for name in configs:
    for method in METHODS:
      for order in ORDERS:
        rs = [r for r in records if (r["config"], r["method"], r["order"]) == (name, method, order)]
        if rs:
          rows.append((name, method, order, f"{np.mean([r['seconds_first'] for r in rs]):.2f}",
                       f"{np.mean([r['seconds'] for r in rs]):.2f}",
                       f"{np.mean([r['compile_seconds'] for r in rs]):.2f}",
                       f"{rs[0]['held_bytes'] / 1024:.0f}",
                       f"{np.max([r['rss_rise_bytes'] for r in rs]) / 2**20:.1f}"))
  out.append(_common.table(rows, ("config", "method", "order", "first s", "warm s",
                                  "of which compile s", "held KiB", "max RSS rise MiB")))
  return "\n\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.llm_oneshot",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=8, help="dense training, 50 steps each")
  parser.add_argument("--steps", type=int, default=None, help="dense training steps (not epochs)")
  parser.add_argument("--calibration", type=int, default=8, help="batches of 16 windows")
  parser.add_argument("--blocksize", type=int, default=16, help="SparseGPT's (inputs: 48, 192)")
  parser.add_argument("--configs", default=",".join(CONFIGS), help="of " + ", ".join(CONFIGS))
  parser.add_argument("--once", action="store_true",
                      help="each pruning call once (compile included), not twice")
  parser.add_argument("--depths", default="2,4,8", help="of the memory-against-depth stack")
  parser.add_argument("--depth-width", type=int, default=256)
  parser.add_argument("--quick", action="store_true",
                      help=f"a tiny run for the smoke test: {QUICK}")
  parser.add_argument("--out", default=str(_common.RESULTS / "llm_oneshot.json"))
  args = parser.parse_args(argv)
  if args.quick:
    for key, value in QUICK.items():
      setattr(args, key, value)
  depths = [int(d) for d in args.depths.split(",") if d]
  configs = [c for c in args.configs.split(",") if c]
  if not configs or set(configs) - set(CONFIGS):
    parser.error(f"--configs: some of {', '.join(CONFIGS)}, not {args.configs!r}")
  records = run(args.seeds, args.epochs, args.calibration, args.blocksize, args.steps,
                configs, args.once)
  print("\n" + tables(records) + "\n")
  memory = depth_memory(depths, args.depth_width, once=args.once)
  path = _common.pathlib.Path(args.out)
  _common.write_json(path, records, args=vars(args), depth_memory=memory)
  print(f"\nwrote {path}")
  return {"records": records, "depth_memory": memory}



if __name__ == "__main__":
  main()
