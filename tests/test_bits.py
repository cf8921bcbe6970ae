"""Masks stored as packed bits: against NumPy's packbits, and in the state."""

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_prune
from optax_prune import _bits
from tests import helpers

_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=19)


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(hnp.arrays(bool, _shapes))
def test_pack_and_unpack_match_numpy(mask):
  bits = _bits.pack(mask)
  flat = mask.reshape(mask.shape or (1,))
  np.testing.assert_array_equal(bits, np.packbits(flat, axis=-1))
  assert bits.shape == _bits.packed_shape(mask.shape) and bits.dtype == jnp.uint8
  np.testing.assert_array_equal(_bits.unpack(bits, mask.shape), mask)
  np.testing.assert_array_equal(_bits.pack_np(mask), bits)
  np.testing.assert_array_equal(_bits.unpack_np(np.asarray(bits), mask.shape), mask)
  assert int(_bits.kept_count(bits)) == int(mask.sum()) == int(_bits.kept_count(mask))
  # A float cast of the bits (a whole-state cast) reads back the same.
  np.testing.assert_array_equal(_bits.unpack(bits.astype(jnp.bfloat16), mask.shape), mask)


def _train(tx, steps=6):
  step = helpers.make_step(tx)
  params, state = helpers.params(), tx.init(helpers.params())
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_packed_masks_equal_bool_masks_and_are_8x_smaller():
  schedule = optax_prune.polynomial_schedule(0.8, begin_step=0, end_step=4, frequency=2)
  runs = {}
  for packed in (False, True):
    tx = optax.chain(optax.adam(1e-2), optax_prune.magnitude_pruning(
        schedule, packed_masks=packed))
    runs[packed] = _train(tx)
  (p_bool, s_bool), (p_packed, s_packed) = runs[False], runs[True]
  jax.tree.map(np.testing.assert_array_equal, p_bool, p_packed)
  stored = optax_prune.find_pruning_state(s_packed).masks
  jax.tree.map(np.testing.assert_array_equal,
               optax_prune.find_pruning_state(s_bool).masks,
               optax_prune.unpack_masks(stored, p_packed))
  nbytes = lambda masks: sum(m.nbytes for m in jax.tree.leaves(masks))
  bool_bytes = nbytes(optax_prune.find_pruning_state(s_bool).masks)
  # Every kernel's last axis is a multiple of 8 here: exactly 8x.
  assert nbytes(stored) * 8 == bool_bytes
  # Summaries and metrics read either layout.
  for state, params in ((s_bool, p_bool), (s_packed, p_packed)):
    summary = optax_prune.sparsity_summary(params, state)
    assert summary.masked_sparsity == pytest.approx(0.8, abs=0.01)
    metrics = optax_prune.pruning_metrics(state, params)
    assert float(metrics["pruning/sparsity"]) == pytest.approx(summary.masked_sparsity)
    assert float(metrics["pruning/sparsity/dense/kernel"]) == summary.rows[3].sparsity


def test_a_float_cast_of_packed_masks_changes_no_mask():
  tx = optax.chain(optax.adam(1e-2), optax_prune.magnitude_pruning(0.5, packed_masks=True))
  step = helpers.make_step(tx)
  p, state = step(helpers.params(), tx.init(helpers.params()))
  cast = optax.tree_utils.tree_map_params(tx, lambda x: x.astype(jnp.bfloat16), state)
  _, from_cast = step(p, cast)
  _, from_bits = step(p, state)
  jax.tree.map(np.testing.assert_array_equal,
               optax_prune.find_pruning_state(from_cast).masks,
               optax_prune.find_pruning_state(from_bits).masks)


def test_a_state_of_the_other_layout_is_a_clear_error():
  params = {"w": jnp.ones((4, 1))}  # A last axis of 1: both layouts have one shape.
  bool_state = optax_prune.magnitude_pruning(0.5).init(params)
  packed_tx = optax_prune.magnitude_pruning(0.5, packed_masks=True)
  with pytest.raises(ValueError, match="holds bool masks, but this transformation has"
                     " `packed_masks=True`"):
    packed_tx.update(params, bool_state, params)
  with pytest.raises(ValueError, match="holds packed"):
    optax_prune.magnitude_pruning(0.5).update(params, packed_tx.init(params), params)
  with pytest.raises(ValueError, match="`packed_masks` must be True or False"):
    optax_prune.magnitude_pruning(0.5, packed_masks=1)
  with pytest.raises(ValueError, match="metrics|packed masks"):
    optax_prune.pruning_metrics(packed_tx.init(params))
