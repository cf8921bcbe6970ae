"""The catalogue of unusual inputs (docs/bad_inputs.md), one test each."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

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


# Random valid and invalid configurations: every invalid argument is refused at
# construction with a ValueError naming it; every valid one builds and runs.
_INT32_MAX = np.iinfo(np.int32).max
_not_a_number = st.sampled_from(["0.5", None, [0.5], True, False, np.bool_(True), 1j])
_bad_fraction = st.one_of(
    _not_a_number, st.floats(allow_nan=True).filter(lambda v: not 0 <= v <= 1))
_fraction = st.floats(0, 1) | st.sampled_from([0, 1, np.float32(0.25), np.float64(0.75)])


def _bad_int(minimum):
  return st.one_of(
      _not_a_number, st.integers(max_value=minimum - 1),
      st.integers(min_value=_INT32_MAX + 1), st.sampled_from([1.0, 2.5, np.float32(3)]))


def _int(minimum, maximum=10**6):
  return st.integers(minimum, maximum) | st.integers(minimum, minimum + 100).map(np.int64)


# Per function: valid values per argument, and invalid ones where they exist.
_VALID = {
    optax_prune.log_schedule: dict(
        sparsity_upper_bound=_fraction, interval_pass=_int(1), end_pass=_int(0),
        steps_per_epoch=_int(1)),
    optax_prune.polynomial_schedule: dict(
        final_sparsity=_fraction, begin_step=_int(0, 1000), end_step=_int(1000),
        frequency=_int(1), initial_sparsity=_fraction,
        power=st.floats(0.01, 10) | st.sampled_from([1, 3])),
    optax_prune.constant_schedule: dict(sparsity=_fraction, step=_int(0)),
    optax_prune.magnitude_pruning: dict(
        schedule=_fraction, scope=st.sampled_from(["layer", "global"]),
        threshold=st.sampled_from(["auto", "sort", "bisect"]),
        where=st.sampled_from([None, {"w": True, "b": False}, lambda path, x: True])),
}
_INVALID = {
    "sparsity_upper_bound": _bad_fraction, "final_sparsity": _bad_fraction,
    "initial_sparsity": _bad_fraction, "sparsity": _bad_fraction,
    # None (nothing pruned) and lists (a pytree of schedules) are valid schedules.
    "schedule": _bad_fraction.filter(lambda v: v is not None and not isinstance(v, list)),
    "interval_pass": _bad_int(1), "end_pass": _bad_int(0), "steps_per_epoch": _bad_int(1),
    "begin_step": _bad_int(0), "end_step": _bad_int(0), "frequency": _bad_int(1),
    "step": _bad_int(0),
    "power": st.one_of(_not_a_number, st.floats(max_value=0), st.sampled_from([np.inf, np.nan])),
    "scope": st.text(max_size=8).filter(lambda v: v not in ("layer", "global")) | _not_a_number,
    "threshold": st.text(max_size=8).filter(lambda v: v not in ("auto", "sort", "bisect")),
    "where": st.sampled_from([[1, 2], {"w": 1}, "kernel", 0.5]),
}
_POSITIONAL = {optax_prune.magnitude_pruning: "schedule"}


@st.composite
def _configurations(draw, valid):
  fn = draw(st.sampled_from(list(_VALID)))
  kwargs = {name: draw(values) for name, values in _VALID[fn].items()}
  bad = None
  if not valid:
    bad = draw(st.sampled_from([n for n in _VALID[fn] if n in _INVALID]))
    kwargs[bad] = draw(_INVALID[bad])
  return fn, kwargs, bad


def _call(fn, kwargs):
  kwargs = dict(kwargs)
  args = [kwargs.pop(_POSITIONAL[fn])] if fn in _POSITIONAL else []
  return fn(*args, **kwargs)


@given(config=_configurations(valid=False))
def test_random_invalid_configurations_name_the_argument(config):
  fn, kwargs, bad = config
  with pytest.raises(ValueError, match=f"`{bad}`"):
    _call(fn, kwargs)


@settings(max_examples=30)
@given(config=_configurations(valid=True))
def test_random_valid_configurations_build_and_prune(config):
  fn, kwargs, _ = config
  built = _call(fn, kwargs)
  tx = built if fn is optax_prune.magnitude_pruning else optax_prune.magnitude_pruning(built)
  params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(3)}
  _, state = jax.eval_shape(tx.update, params, tx.init(params), params)
  assert state.masks["w"].shape == (3, 4)


def test_a_group_past_int32_entries_is_refused_at_init():
  # Abstract params: no 8 GiB leaf is allocated.
  params = {"a": jax.ShapeDtypeStruct((2**16, 2**15 - 1), jnp.float32),
            "b": jax.ShapeDtypeStruct((256, 257), jnp.float32)}
  with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1"):
    jax.eval_shape(optax_prune.magnitude_pruning(0.5, scope="global").init, params)
  # Per layer each group fits.
  jax.eval_shape(optax_prune.magnitude_pruning(0.5).init, params)
