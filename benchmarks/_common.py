"""Shared benchmark helpers: side-by-side timing, machine info, output files."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import jax

from optax_prune import _tables

RESULTS = pathlib.Path(__file__).parent / "results"


def block(tree):
  return jax.tree.map(lambda x: x.block_until_ready(), tree)


def time_side_by_side(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
    statistic: Callable[[list[float]], float] = statistics.median,
) -> dict[str, float]:
  """Seconds per call of each function (median, or ``statistic`` of the
  repeats), measured interleaved.

  Interleaving (a, b, a, b, ...) exposes every function to the same drift of a
  shared machine, so the ratios are fair even when absolute times wander.
  """
  for fn in fns.values():
    for _ in range(warmup):
      block(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      block(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistic(ts) for name, ts in times.items()}


def machine() -> dict:
  return {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "command": " ".join([pathlib.Path(sys.executable).name] + sys.argv),
  }


def write_json(path: pathlib.Path, records: Sequence[dict], **header) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = {"machine": machine(), **header, "records": list(records)}
  path.write_text(json.dumps(payload, indent=2) + "\n")


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
  return _tables.format_table(header, rows)


def save_figure(fig, path: pathlib.Path) -> None:
  """Writes a matplotlib figure as a PNG (making its folder) and closes it."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
