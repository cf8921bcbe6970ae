"""sparsity_summary against direct NumPy counts, on several pytree kinds."""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

import optax_prune


class Pair(NamedTuple):
  a: jnp.ndarray
  b: jnp.ndarray


@pytest.mark.parametrize("tree", [
    {"w": jnp.array([[0.0, 1.0], [0.0, -0.0]]), "b": jnp.array([0.0, 2.0, 3.0])},
    (jnp.zeros((2, 3)), [jnp.ones(4), jnp.array([0.0, 5.0])]),
    FrozenDict({"layer": {"kernel": jnp.array([[1.0, 0.0]])}}),
    Pair(jnp.array([0.0]), jnp.zeros((0, 3))),
])
def test_counts_match_numpy(tree):
  import jax
  leaves = jax.tree.leaves(tree)
  summary = optax_prune.sparsity_summary(tree)
  assert [r.zeros for r in summary.rows] == [int(np.sum(np.asarray(x) == 0)) for x in leaves]
  assert [r.size for r in summary.rows] == [x.size for x in leaves]
  assert summary.size == sum(x.size for x in leaves)
  total = sum(int(np.sum(np.asarray(x) == 0)) for x in leaves)
  assert summary.sparsity == (total / summary.size if summary.size else 0.0)
  assert summary.pruned is None and summary.masked_sparsity is None
  text = str(summary)
  assert "total" in text and all(r.path in text for r in summary.rows)


def test_masks_count_pruned_not_zeros():
  # A kept weight that is zero by chance is not pruned.
  params = {"w": jnp.array([[0.0, 1.0], [2.0, 3.0]]), "b": jnp.zeros(2)}
  masks = {"w": jnp.array([[True, False], [True, True]]), "b": optax.MaskedNode()}
  summary = optax_prune.sparsity_summary(params, masks)
  rows = {r.path: r for r in summary.rows}
  assert rows["['w']"].pruned == 1 and rows["['w']"].zeros == 1
  assert rows["['b']"].pruned is None
  assert summary.pruned == 1 and summary.masked_sparsity == 0.25
  assert summary.sparsity == 1 / 6


def test_rows_read_masks_and_the_table_warns_from_the_counters():
  # Zeros and pruned entries differ: a kept 0 ([0, 0]) and two pruned
  # entries that are not 0 (a link after the pruning moved them).
  params = {"w": jnp.array([[0.0, 1.0], [2.0, 3.0]]), "b": jnp.zeros(2)}
  masks = {"w": jnp.array([[True, False], [False, True]]), "b": optax.MaskedNode()}
  summary = optax_prune.sparsity_summary(params, masks)
  (b, w) = summary.rows
  assert (w.zeros, w.pruned, w.sparsity, w.pruned_nonzero) == (1, 2, 0.5, 2)
  assert (b.zeros, b.pruned, b.sparsity, b.pruned_nonzero) == (2, None, 1.0, None)
  assert (summary.pruned, summary.masked_sparsity, summary.pruned_nonzero) == (2, 0.5, 2)
  assert summary.sparsity == 2 / 6
  lines = str(summary).splitlines()
  assert lines[0].split() == ["path", "shape", "size", "zeros", "pruned", "sparsity"]
  assert lines[-2].split() == ["masked", "leaves", "4", "1", "2", "50.00%"]
  assert lines[-1].startswith("WARNING: 2 pruned entries are not zero")
  # The step counters: micro-batches from half of the steps (and two) on,
  # skipped mask updates whenever there are any.
  quiet = optax_prune.sparsity_summary({"w": params["w"]}, {"w": jnp.ones((2, 2), bool)})
  for steps, zero, warned in ((4, 2, True), (5, 2, False), (2, 1, False), (3, 3, True)):
    text = str(quiet._replace(steps=steps, zero_update_steps=zero))
    assert ("MultiSteps" in text) == warned, (steps, zero)
  assert "WARNING" not in str(quiet)
  assert "WARNING: 3 steps at which the pruning schedule was due" in str(
      quiet._replace(skipped_mask_updates=3))


def test_masks_of_another_structure_are_rejected():
  with pytest.raises(ValueError, match="masks"):
    optax_prune.sparsity_summary({"w": jnp.ones(2)}, {"v": jnp.ones(2, bool)})


def _read_scalars(log_dir):
  """(tag, step, value) of every scalar in the TensorBoard event files of
  ``log_dir``, parsed from the TFRecord framing with tensorboardX's protos."""
  import struct
  from tensorboardX.proto import event_pb2

  out = []
  for path in sorted(log_dir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4  # Length, its CRC, the record, its CRC.
      out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_pruning_metrics_in_a_jitted_step_reach_tensorboard(tmp_path):
  from tensorboardX import SummaryWriter
  import jax
  from tests import helpers

  schedule = optax_prune.polynomial_schedule(0.5, begin_step=0, end_step=2, frequency=1)
  tx = optax.chain(optax.adam(1e-2), optax_prune.magnitude_pruning(schedule))

  @jax.jit
  def step(params, state):
    grads = jax.grad(helpers.loss)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return params, state, optax_prune.pruning_metrics(state, params)

  params, state = helpers.params(), tx.init(helpers.params())
  writer = SummaryWriter(str(tmp_path))
  logged = []
  for t in range(3):
    params, state, metrics = step(params, state)
    for tag, value in metrics.items():
      writer.add_scalar(tag, float(value), t)
      logged.append((tag, t, float(value)))
  writer.close()
  read = _read_scalars(tmp_path)
  assert {(tag, t): v for tag, t, v in read} == pytest.approx(
      {(tag, t): v for tag, t, v in logged})
  assert len(read) == len(logged)
  tags = {tag for tag, _, _ in read}
  assert {"pruning/sparsity", "pruning/step", "pruning/model_sparsity",
          "pruning/sparsity/dense/kernel", "pruning/target/conv/kernel"} <= tags
  final = {tag: v for tag, t, v in read if t == 2}
  summary = optax_prune.sparsity_summary(params, state)
  assert final["pruning/sparsity"] == pytest.approx(summary.masked_sparsity)
  assert final["pruning/model_sparsity"] == pytest.approx(summary.sparsity)
