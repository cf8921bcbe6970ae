"""Draws docs/schedules.png: sparsity against step for the three schedules.

Run as ``python scripts/plot_schedules.py`` (``make schedules-plot``). Each
schedule is evaluated at every step with one ``jax.vmap``, exactly as the
transformation calls it; dots mark the steps whose ``update`` is true, where
the masks are recomputed.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # Files only: no display on CI machines.
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

import optax_prune  # noqa: E402

STEPS = 700  # Past both ramps (step 600), to show the values are held.
ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "schedules.png"

SCHEDULES = {
    "log_schedule(0.9, interval_pass=3, end_pass=60, steps_per_epoch=10)":
        optax_prune.log_schedule(
            0.9, interval_pass=3, end_pass=60, steps_per_epoch=10
        ),
    "polynomial_schedule(0.9, begin_step=0, end_step=600, frequency=30)":
        optax_prune.polynomial_schedule(
            0.9, begin_step=0, end_step=600, frequency=30
        ),
    "constant_schedule(0.9, step=0)":
        optax_prune.constant_schedule(0.9, step=0),
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args(argv)

  steps = jnp.arange(STEPS, dtype=jnp.int32)
  fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
  styles = ({"ls": "-"}, {"ls": "-"}, {"ls": "--"})
  for (label, schedule), style in zip(SCHEDULES.items(), styles):
    target = jax.vmap(schedule)(steps)
    (line,) = ax.plot(steps, target.sparsity, label=label, lw=1.5, **style)
    ax.plot(steps[target.update], target.sparsity[target.update], "o",
            color=line.get_color(), ms=4)
  # A proxy artist, so the legend explains the dots once.
  ax.plot([], [], "o", color="0.4", ms=4, label="mask update (update=True)")
  ax.set(
      title="optax_prune sparsity schedules (final sparsity 0.9)",
      xlabel="training step (optimizer updates)",
      ylabel="target sparsity (fraction pruned)",
      xlim=(-10, STEPS), ylim=(-0.02, 1.0),
  )
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize="small")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
