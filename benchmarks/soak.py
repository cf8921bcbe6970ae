"""Soak: a long pruned run must not grow in memory, step time or compilations.

Run as ``python -m benchmarks.soak`` (10,000 steps, a mask update every 100).
It trains the digits CNN of the demo with ``adam`` and
``magnitude_pruning(polynomial_schedule(..., frequency=100))`` in one jitted
step that draws its own batch on the device, and per window of 100 steps
records the median step time, the bytes of live device arrays, the device's
``bytes_in_use`` (where the backend reports it) and the process's resident
memory. It prints the first and last windows, fitted trends, the number of
traces of the step, and saves ``benchmarks/results/soak.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

import optax_prune
from benchmarks import _common
from benchmarks import demo_digits


def resident_bytes() -> int:
  """The process's resident memory (Linux ``/proc``; 0 where unavailable)."""
  try:
    pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
  except OSError:
    return 0
  import resource  # Only on Unix; imported here for the page size.
  return pages * resource.getpagesize()


def device_bytes_in_use() -> Optional[int]:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("bytes_in_use", 0))


def live_array_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays())


def slope_per_1000(steps: Sequence[float], values: Sequence[float]) -> float:
  """Least-squares change of ``values`` per 1,000 steps."""
  if len(steps) < 2:
    return 0.0
  return float(np.polyfit(np.asarray(steps, float), np.asarray(values, float), 1)[0] * 1000)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=10_000)
  parser.add_argument("--frequency", type=int, default=100,
                      help="steps between mask updates")
  parser.add_argument("--window", type=int, default=100,
                      help="steps per recorded window")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--sparsity", type=float, default=0.9)
  parser.add_argument("--out", default=str(_common.RESULTS / "soak.json"))
  parser.add_argument("--plot", default=str(_common.RESULTS / "soak.png"))
  args = parser.parse_args(argv)

  x_train, _, y_train, _ = demo_digits.load_digits()
  images, labels = jnp.asarray(x_train), jnp.asarray(y_train)
  schedule = optax_prune.polynomial_schedule(
      args.sparsity, begin_step=0, end_step=args.steps - 1, frequency=args.frequency)
  tx = optax.chain(optax.adam(1e-3), optax_prune.magnitude_pruning(schedule))
  model = demo_digits.CNN()
  params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  traces = [0]

  @jax.jit
  def step(state, key):
    traces[0] += 1  # Runs at trace time only.
    batch = jax.random.randint(key, (args.batch_size,), 0, images.shape[0])

    def loss(params):
      logits = state.apply_fn({"params": params}, images[batch])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels[batch]).mean()

    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  keys = jax.random.split(jax.random.key(1), args.steps)
  windows, times = [], []
  for t in tqdm(range(args.steps), desc="soak", mininterval=1.0):
    start = time.perf_counter()
    state = step(state, keys[t])
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
    if (t + 1) % args.window == 0:
      windows.append({
          "end_step": t + 1,
          "median_step_seconds": statistics.median(times),
          "max_step_seconds": max(times),
          "live_array_bytes": live_array_bytes(),
          "device_bytes_in_use": device_bytes_in_use(),
          "resident_bytes": resident_bytes(),
      })
      times = []

  pruning = optax_prune.find_pruning_state(state.opt_state)
  masked = optax_prune.sparsity_summary(state.params, masks=pruning.masks).masked_sparsity
  # The first window holds the compilation; trends are fitted after it.
  steady = windows[1:] or windows
  ends = [w["end_step"] for w in steady]
  summary = {
      "steps": args.steps, "frequency": args.frequency, "window": args.window,
      "traces": traces[0], "final_masked_sparsity": masked,
      "step_seconds_first": steady[0]["median_step_seconds"],
      "step_seconds_last": steady[-1]["median_step_seconds"],
      "step_seconds_slope_per_1000": slope_per_1000(
          ends, [w["median_step_seconds"] for w in steady]),
      "live_array_bytes_min": min(w["live_array_bytes"] for w in steady),
      "live_array_bytes_max": max(w["live_array_bytes"] for w in steady),
      "resident_growth_bytes": steady[-1]["resident_bytes"] - steady[0]["resident_bytes"],
      # Allocators warm up early; a leak would also grow in the second half.
      "resident_growth_second_half_bytes": (
          steady[-1]["resident_bytes"] - steady[len(steady) // 2]["resident_bytes"]),
      "resident_slope_bytes_per_1000": slope_per_1000(
          ends, [w["resident_bytes"] for w in steady]),
  }
  shown = windows if len(windows) <= 6 else windows[:3] + windows[-3:]
  print(_common.table(
      [(w["end_step"], f"{w['median_step_seconds'] * 1e3:.3f}",
        f"{w['max_step_seconds'] * 1e3:.2f}", f"{w['live_array_bytes']:,}",
        "-" if w["device_bytes_in_use"] is None else f"{w['device_bytes_in_use']:,}",
        f"{w['resident_bytes'] / 2**20:.1f}") for w in shown],
      ("steps", "median ms", "max ms", "live array B", "device in use B", "RSS MiB")))
  print(f"\ntraces of the step: {summary['traces']}; final masked sparsity"
        f" {masked:.4f}\nstep time {summary['step_seconds_first'] * 1e3:.3f} ->"
        f" {summary['step_seconds_last'] * 1e3:.3f} ms (slope"
        f" {summary['step_seconds_slope_per_1000'] * 1e6:+.2f} us per 1,000 steps);"
        f" live arrays {summary['live_array_bytes_min']:,}-"
        f"{summary['live_array_bytes_max']:,} B; RSS growth"
        f" {summary['resident_growth_bytes'] / 2**20:+.2f} MiB, in the second half"
        f" {summary['resident_growth_second_half_bytes'] / 2**20:+.2f} MiB")

  out = pathlib.Path(args.out)
  _common.write_json(out, windows, summary=summary)
  plot(windows, pathlib.Path(args.plot))
  print(f"\nwrote {out} and {args.plot}")
  return summary


def plot(windows, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ends = [w["end_step"] for w in windows]
  fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(10, 3.5))
  ax_time.plot(ends, [w["median_step_seconds"] * 1e3 for w in windows])
  ax_time.set(xlabel="step", ylabel="median step time per window (ms)",
              title="step time", ylim=(0, None))
  # Changes against the window after compilation, so that MiB-sized live
  # arrays and a GiB-sized process share one readable axis.
  base = windows[1] if len(windows) > 1 else windows[0]
  for key, label in [("live_array_bytes", "live device arrays"),
                     ("device_bytes_in_use", "device bytes in use"),
                     ("resident_bytes", "process RSS")]:
    if base[key] is not None:
      ax_memory.plot(ends, [(w[key] - base[key]) / 2**20 for w in windows], label=label)
  ax_memory.set(xlabel="step", ylabel="MiB, change since step "
                f"{base['end_step']}", title="memory growth")
  ax_memory.legend()
  _common.save_figure(fig, path)


if __name__ == "__main__":
  main()
