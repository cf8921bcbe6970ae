"""The catalogue of unusual inputs (docs/bad_inputs.md), one test each."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_prune


def _update(tx, params):
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
  return optax.apply_updates(params, updates), state


def test_zero_size_and_one_element_leaves():
  params = {"empty": jnp.zeros((0, 5)), "one": jnp.full((1, 1), 3.0)}
  for s, pruned_one in [(0.4, 0), (0.6, 1), (1.0, 1)]:
    new, state = _update(optax_prune.magnitude_pruning(s), params)
    assert state.masks["empty"].shape == (0, 5)
    assert int((~state.masks["one"]).sum()) == pruned_one
    assert float(new["one"][0, 0]) == (0.0 if pruned_one else 3.0)


def test_integer_bool_and_complex_leaves_are_skipped_by_default_and_rejected_if_chosen():
  params = {"i": jnp.ones((3, 3), jnp.int32), "b": jnp.ones((3, 3), bool),
            "c": jnp.ones((3, 3), jnp.complex64), "w": jnp.ones((3, 3))}
  state = optax_prune.magnitude_pruning(0.5).init(params)
  for name in ("i", "b", "c"):
    assert isinstance(state.masks[name], optax.MaskedNode)
  for name in ("i", "b", "c"):
    with pytest.raises(ValueError, match="only floating leaves"):
      optax_prune.magnitude_pruning(0.5, where={k: k == name for k in params}).init(params)


def test_nan_and_inf_weights_are_kept_until_sparsity_one():
  params = {"w": jnp.array([[jnp.nan, 1.0, -jnp.inf, 0.5]])}
  new, state = _update(optax_prune.magnitude_pruning(0.5), params)
  np.testing.assert_array_equal(state.masks["w"], [[True, False, True, False]])
  assert bool(jnp.isnan(new["w"][0, 0])) and float(new["w"][0, 2]) == -np.inf
  # At sparsity 1 they are pruned too; -p cannot cancel a non-finite p, so the
  # weight becomes NaN rather than 0 (documented).
  new, state = _update(optax_prune.magnitude_pruning(1.0), params)
  assert not bool(state.masks["w"].any())
  assert bool(jnp.isnan(new["w"][0, 0])) and float(new["w"][0, 1]) == 0.0


def test_schedule_values_outside_the_unit_interval_are_clipped():
  def wild(step):
    return optax_prune.PruningTarget(jnp.float32(7.0), step == 0)
  _, state = _update(optax_prune.magnitude_pruning(wild), {"w": jnp.ones((4, 4))})
  assert not bool(state.masks["w"].any())


def test_step_counter_saturates_instead_of_wrapping():
  schedule = optax_prune.constant_schedule(0.5)
  tx = optax_prune.magnitude_pruning(schedule)
  params = {"w": jnp.arange(1.0, 5.0).reshape(2, 2)}
  state = tx.init(params)._replace(count=jnp.int32(np.iinfo(np.int32).max))
  _, state = tx.update(params, state, params)
  assert int(state.count) == np.iinfo(np.int32).max  # Not wrapped to step 0.
  assert bool(state.masks["w"].all())  # So no new one-shot update ran.


def test_params_that_change_structure_between_init_and_update():
  tx = optax_prune.magnitude_pruning(0.5)
  state = tx.init({"w": jnp.ones((3, 3))})
  for params in ({"w": jnp.ones((3, 3)), "x": jnp.ones((2, 2))}, [jnp.ones((3, 3))]):
    with pytest.raises(ValueError, match="do not match the pruning state"):
      tx.update(params, state, params)
