"""Dense vs gradually pruned CNN on scikit-learn's handwritten digits.

Run as ``python -m benchmarks.demo_digits`` (``make demo``). The data set ships
with scikit-learn (1797 8x8 images), so nothing is downloaded. The same model,
seed, batch order and number of epochs are trained twice: with ``optax.adam``
alone, then with ``magnitude_pruning(log_schedule(...))`` as the last link of
the chain. Both runs use one jitted train step, traced once per optimizer.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from sklearn import datasets
from sklearn import model_selection
from tqdm import tqdm

import optax_prune

# Fixed apart from --seed, so that every seed is scored on the same test set.
SPLIT_SEED = 0
TEST_FRACTION = 0.25
LEARNING_RATE = 1e-3
# The sparsity rises over the first END_FRACTION of the epochs; the rest
# fine-tunes the surviving weights at the final sparsity.
END_FRACTION = 2 / 3

# Python-side count of traces of `train_step`: a retrace per epoch would show
# up here, and `main` returns it so that a test can check.
_TRACES = [0]


class CNN(nn.Module):
  """Two 3x3 convolutions, a 2x2 average pool and two dense layers."""

  widths: tuple[int, int, int] = (32, 64, 128)  # Smaller ones: `benchmarks.shrink`.

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.widths[0], (3, 3))(x))
    x = nn.relu(nn.Conv(self.widths[1], (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.widths[2])(x))
    return nn.Dense(10)(x)


@jax.jit
def train_step(state, images, labels):
  _TRACES[0] += 1  # Runs at trace time only.

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels
    ).mean()

  grads = jax.grad(loss_fn)(state.params)
  # `apply_gradients` passes the params to `tx.update`, as pruning needs.
  return state.apply_gradients(grads=grads)


@jax.jit
def accuracy(params, images, labels):
  # Takes params, not the TrainState: its `tx` is static, so passing the
  # state would compile this again for the pruned run.
  logits = CNN().apply({"params": params}, images)
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def load_digits():
  """Train/test arrays: images in [0, 1] of shape (n, 8, 8, 1), int32 labels."""
  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  return model_selection.train_test_split(
      images, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
      stratify=labels,
  )


def kernel_sparsity(state) -> float:
  """Pruned fraction of the pruned leaves (kernels), read from the masks."""
  masks = optax_prune.find_pruning_state(state.opt_state).masks
  return optax_prune.sparsity_summary(state.params, masks=masks).masked_sparsity


def train(name, tx, params, data, args, *, pruning) -> train_state.TrainState:
  """Trains the CNN from `params` with `tx`; prints one line per epoch."""
  x_train, x_test, y_train, y_test = data
  state = train_state.TrainState.create(
      apply_fn=CNN().apply, params=params, tx=tx
  )
  # Same batch order in both runs: the only difference is the pruning.
  rng = np.random.default_rng(args.seed)
  steps = len(x_train) // args.batch_size
  for epoch in tqdm(range(args.epochs), desc=name, leave=False):
    # Whole batches only, so every step has the same shapes (one trace) and
    # an epoch is exactly `steps` steps, as the schedule assumes.
    order = rng.permutation(len(x_train))[: steps * args.batch_size]
    for batch in order.reshape(steps, args.batch_size):
      state = train_step(state, x_train[batch], y_train[batch])
    line = f"{name:>6}  epoch {epoch + 1:3d}"
    if pruning:
      pruning_state = optax_prune.find_pruning_state(state.opt_state)
      # The schedule's sparsity over all kernels: ERK (the default) shares it
      # among them (small kernels denser), so per-leaf targets differ.
      sizes = np.asarray([m.size for m in jax.tree.leaves(pruning_state.masks)])
      target = float(np.dot(pruning_state.target_sparsity, sizes) / sizes.sum())
      line += f"  target {target:6.2%}  kernels {kernel_sparsity(state):6.2%}"
    test_accuracy = float(accuracy(state.params, x_test, y_test))
    line += f"  test accuracy {test_accuracy:6.2%}"
    tqdm.write(line)
  return state


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.demo_digits",
      description=__doc__.split("\n")[0],
  )
  parser.add_argument("--epochs", type=int, default=40,
                      help="epochs per run (dense, then pruned)")
  parser.add_argument("--seed", type=int, default=0,
                      help="init and batch-order seed (the split is fixed)")
  parser.add_argument("--sparsity", type=float, default=0.9,
                      help="final fraction of all kernel weights pruned (shared"
                      " among the kernels by ERK: smaller kernels denser)")
  parser.add_argument("--batch-size", type=int, default=64)
  args = parser.parse_args(argv)
  if args.epochs < 1:
    parser.error(f"--epochs must be >= 1; got {args.epochs}.")
  if not 0.0 <= args.sparsity <= 1.0:
    parser.error(f"--sparsity must be in [0, 1]; got {args.sparsity}.")
  if args.batch_size < 1:
    parser.error(f"--batch-size must be >= 1; got {args.batch_size}.")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the demo; returns the final numbers (fractions, not percents)."""
  args = parse_args(argv)
  data = load_digits()
  if args.batch_size > len(data[0]):
    raise ValueError(
        f"--batch-size must be at most the {len(data[0])} training images;"
        f" got {args.batch_size}."
    )
  steps_per_epoch = len(data[0]) // args.batch_size
  end_pass = int(args.epochs * END_FRACTION)
  schedule = optax_prune.log_schedule(
      args.sparsity, interval_pass=1, end_pass=end_pass,
      steps_per_epoch=steps_per_epoch,
  )
  # Jitted because, run eagerly, every initializer op compiles on its own.
  params = jax.jit(CNN().init)(jax.random.key(args.seed), data[0][:1])["params"]
  traces_before = _TRACES[0]

  # Both runs start from the same weights.
  dense = train(
      "dense", optax.adam(LEARNING_RATE), params, data, args, pruning=False
  )
  pruned = train(
      "pruned",
      optax.chain(
          optax.adam(LEARNING_RATE), optax_prune.magnitude_pruning(schedule)
      ),
      params, data, args, pruning=True,
  )

  x_test, y_test = data[1], data[3]
  result = {
      "dense_accuracy": float(accuracy(dense.params, x_test, y_test)),
      "pruned_accuracy": float(accuracy(pruned.params, x_test, y_test)),
      "final_sparsity": kernel_sparsity(pruned),
      # One trace per optimizer (dense, pruned); more means a recompile.
      "train_step_traces": _TRACES[0] - traces_before,
  }
  masks = optax_prune.find_pruning_state(pruned.opt_state).masks
  print()
  print(optax_prune.sparsity_summary(pruned.params, masks=masks))
  print()
  print(
      f"dense accuracy {result['dense_accuracy']:.2%} vs pruned accuracy"
      f" {result['pruned_accuracy']:.2%} at {result['final_sparsity']:.2%}"
      f" kernel sparsity ({args.epochs} epochs, seed {args.seed})"
  )
  return result


if __name__ == "__main__":
  main()
