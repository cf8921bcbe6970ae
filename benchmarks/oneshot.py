"""One-shot pruning of a trained character transformer: magnitude against
activation-aware (Wanda) scores, at 50% unstructured and at 2:4.

Run as ``python -m benchmarks.oneshot``. For each seed: the character model of
``benchmarks.accuracy`` is trained dense; input-feature norms are collected
from calibration batches of training windows (``input_norms``, read off the
jaxpr); then the kernels (not the embedding tables) are pruned once with
``prune``: magnitude per leaf, and Wanda (``|w| * ||x||``, compared within
each output at 50%; along the input axis at 2:4). The validation loss is
measured right after pruning and after a short fine-tune with the masks kept
(``magnitude_pruning`` at the same target finds the same masks: the pruned
weights are 0; checked). Saves ``benchmarks/results/oneshot.json`` and a PNG.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

import optax_prune
from benchmarks import _common
from benchmarks import accuracy

CONFIGS = {  # name: (sparsity, granularity, Wanda's comparison)
    "50%": (0.5, None, "output"),
    "2:4": (1.0, optax_prune.n_of_m(2, 4, axis=0), "leaf"),
}


def train(task, tx, params, steps, rng):
  # The step donates its state: train a copy, leaving the caller's arrays.
  params = jax.tree.map(jnp.copy, params)
  state = train_state.TrainState.create(apply_fn=task.model.apply, params=params, tx=tx)
  step = accuracy.make_train_step(task)
  done = 0
  while done < steps:
    for x, y in zip(*task.epoch_batches(rng)):
      if done == steps:
        break
      state = step(state, x, y)
      done += 1
  return state


def run(seeds: int, epochs: int, finetune_steps: int, calibration: int, bar) -> list[dict]:
  task = accuracy.make_task("chars")
  fn = lambda p, x: task.model.apply({"params": p}, x)
  records = []
  for seed in range(seeds):
    rng = np.random.default_rng(seed)
    params = jax.jit(task.model.init)(jax.random.key(seed), task.example())["params"]
    dense = train(task, optax.adam(task.learning_rate), params,
                  epochs * task.steps_per_epoch, rng).params
    dense_loss = task.evaluate(dense)
    xs, _ = task.epoch_batches(np.random.default_rng(1000 + seed))
    norms = optax_prune.input_norms(fn, dense, xs[:calibration])
    for name, (sparsity, granularity, compare) in CONFIGS.items():
      for method in ("magnitude", "wanda"):
        # Default where: the kernels. Uniform: every kernel at the target, as
        # Wanda prunes (the default's ERK would share it unevenly).
        kwargs = dict(granularity=granularity, distribution="uniform")
        if method == "wanda":
          kwargs.update(input_norms=norms, compare=compare)
        pruned, masks = optax_prune.prune(dense, sparsity, **kwargs)
        one_shot = task.evaluate(pruned)
        tx = optax.chain(optax.adam(task.learning_rate / 3), optax_prune.magnitude_pruning(
            sparsity, granularity=granularity, distribution="uniform"))
        tuned = train(task, tx, pruned, finetune_steps, np.random.default_rng(2000 + seed))
        kept = optax_prune.find_pruning_state(tuned.opt_state).masks
        same = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(masks)))
        records.append({
            "seed": seed, "config": name, "method": method, "dense_val_loss": dense_loss,
            "one_shot_val_loss": one_shot, "finetuned_val_loss": task.evaluate(tuned.params),
            "masks_kept_by_finetune": same,
            "sparsity": float(np.mean([1 - np.asarray(m).mean() for m in jax.tree.leaves(masks)])),
        })
        bar.update()
  return records


def summarize(records: list[dict]) -> list[dict]:
  rows = []
  for name in CONFIGS:
    for method in ("magnitude", "wanda"):
      rs = [r for r in records if r["config"] == name and r["method"] == method]
      stat = lambda k: (float(np.mean([r[k] for r in rs])),
                        float(np.std([r[k] for r in rs], ddof=1)) if len(rs) > 1 else 0.0)
      rows.append({"config": name, "method": method, "dense": stat("dense_val_loss"),
                   "one_shot": stat("one_shot_val_loss"), "finetuned": stat("finetuned_val_loss"),
                   "masks_kept": all(r["masks_kept_by_finetune"] for r in rs), "seeds": len(rs)})
  return rows


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.oneshot",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=8, help="dense training, 50 steps each")
  parser.add_argument("--finetune-steps", type=int, default=50)
  parser.add_argument("--calibration", type=int, default=8, help="batches of 16 windows")
  parser.add_argument("--out", default=str(_common.RESULTS / "oneshot.json"))
  parser.add_argument("--plot", default=str(_common.RESULTS / "oneshot.png"))
  args = parser.parse_args(argv)
  with tqdm(total=args.seeds * len(CONFIGS) * 2, desc="one-shot") as bar:
    records = run(args.seeds, args.epochs, args.finetune_steps, args.calibration, bar)
  rows = summarize(records)
  fmt = lambda ms: f"{ms[0]:.3f} ± {ms[1]:.3f}"
  print(_common.table(
      [(r["config"], r["method"], fmt(r["dense"]), fmt(r["one_shot"]), fmt(r["finetuned"]),
        "yes" if r["masks_kept"] else "NO") for r in rows],
      ("config", "scores", "dense val loss", "one-shot", f"+ {args.finetune_steps} steps",
       "masks kept")))
  path = _common.pathlib.Path(args.out)
  _common.write_json(path, records, summary=rows, args=vars(args))
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for k, (stage, hatch) in enumerate((("one_shot", ""), ("finetuned", "//"))):
    for j, r in enumerate(rows):
      ax.bar(j + 0.4 * k, r[stage][0], 0.4, yerr=r[stage][1], hatch=hatch,
             color="C0" if r["method"] == "magnitude" else "C1",
             label=f"{r['method']}, {stage.replace('_', '-')}" if j < 2 else None)
  ax.axhline(rows[0]["dense"][0], color="k", lw=1, label="dense")
  ax.set_xticks([j + 0.2 for j in range(len(rows))], [f"{r['config']}\n{r['method']}" for r in rows])
  ax.set_ylabel("validation loss (nats/char)")
  ax.legend(fontsize="small")
  _common.save_figure(fig, _common.pathlib.Path(args.plot))
  print(f"\nwrote {path} and {args.plot}")
  return {"records": records, "summary": rows}


if __name__ == "__main__":
  main()
