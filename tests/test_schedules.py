"""Schedules against tables computed from their formulas, on traced steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import optax_prune
from tests import reference

pytestmark = pytest.mark.usefixtures("strict_promotion")


def _run(schedule, steps):
  """Evaluates on traced steps: one jitted, vmapped call."""
  out = jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32))
  return np.asarray(out.sparsity), np.asarray(out.update)


@pytest.mark.parametrize(
    "upper,interval,end,per_epoch",
    [(0.9, 3, 60, 5), (0.9, 1, 10, 100), (0.5, 4, 10, 3), (0.8, 2, 0, 7), (1.0, 7, 7, 1)],
)
def test_log_schedule_matches_formula_table(upper, interval, end, per_epoch):
  schedule = optax_prune.log_schedule(upper, interval, end, steps_per_epoch=per_epoch)
  steps = np.arange(0, (end + 5) * per_epoch)
  sparsity, update = _run(schedule, steps)
  epochs = steps // per_epoch
  expected = [reference.log_sparsity(e, upper, interval, end) for e in epochs]
  np.testing.assert_allclose(sparsity, expected, rtol=1e-6, atol=1e-7)
  update_epochs = {e for e in range(end + 1) if e % interval == 0} | {end}
  expected_update = [(s % per_epoch == 0) and (e in update_epochs) for s, e in zip(steps, epochs)]
  np.testing.assert_array_equal(update, expected_update)
  # The upper bound is reached exactly at end_pass and held.
  assert np.all(sparsity[epochs >= end] == np.float32(upper))


def test_log_schedule_defaults_are_the_originals():
  schedule = optax_prune.log_schedule(0.9, steps_per_epoch=1)
  sparsity, update = _run(schedule, np.arange(70))
  assert list(np.flatnonzero(update)) == list(range(0, 61, 3))
  np.testing.assert_allclose(sparsity[3], 0.9 * np.log(3) / np.log(22), rtol=1e-6)


@pytest.mark.parametrize(
    "final,begin,end,freq,initial,power",
    [(0.9, 0, 100, 10, 0.0, 3), (0.8, 10, 25, 10, 0.0, 3), (0.95, 5, 5, 3, 0.1, 3),
     (0.7, 3, 50, 7, 0.2, 1), (0.5, 0, 33, 100, 0.0, 2.5)],
)
def test_polynomial_schedule_matches_formula_table(final, begin, end, freq, initial, power):
  schedule = optax_prune.polynomial_schedule(
      final, begin_step=begin, end_step=end, frequency=freq,
      initial_sparsity=initial, power=power)
  steps = np.arange(0, end + 20)
  sparsity, update = _run(schedule, steps)
  expected = [reference.polynomial_sparsity(t, final, begin, end, freq, initial, power) for t in steps]
  np.testing.assert_allclose(sparsity, expected, rtol=1e-5, atol=1e-6)
  expected_update = [(begin <= t <= end) and ((t - begin) % freq == 0 or t == end) for t in steps]
  np.testing.assert_array_equal(update, expected_update)
  # Reaches the final sparsity exactly at end_step even when not on the grid.
  assert sparsity[end] == np.float32(final) and update[end]


def test_constant_schedule_prunes_once():
  sparsity, update = _run(optax_prune.constant_schedule(0.6, step=4), np.arange(10))
  np.testing.assert_array_equal(update, np.arange(10) == 4)
  np.testing.assert_array_equal(sparsity, np.where(np.arange(10) >= 4, np.float32(0.6), 0.0))


@given(st.floats(0, 1), st.integers(1, 5), st.integers(0, 30), st.integers(1, 9))
def test_log_schedule_is_non_decreasing_and_bounded(upper, interval, end, per_epoch):
  schedule = optax_prune.log_schedule(upper, interval, end, steps_per_epoch=per_epoch)
  sparsity, _ = _run(schedule, np.arange(0, (end + 3) * per_epoch))
  assert np.all(np.diff(sparsity) >= 0)
  assert np.all((sparsity >= 0) & (sparsity <= np.float32(upper)))


def test_schedules_do_not_recompile_per_step():
  schedule = optax_prune.polynomial_schedule(0.9, begin_step=0, end_step=50, frequency=5)
  traces = []

  @jax.jit
  def f(step):
    traces.append(1)
    return schedule(step)

  for step in range(60):
    f(jnp.int32(step))
  assert len(traces) == 1


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: optax_prune.log_schedule(1.5, steps_per_epoch=1), "sparsity_upper_bound"),
        (lambda: optax_prune.log_schedule(float("nan"), steps_per_epoch=1), "sparsity_upper_bound"),
        (lambda: optax_prune.log_schedule(0.5, 0, steps_per_epoch=1), "interval_pass"),
        (lambda: optax_prune.log_schedule(0.5, 1, -1, steps_per_epoch=1), "end_pass"),
        (lambda: optax_prune.log_schedule(0.5, steps_per_epoch=0), "steps_per_epoch"),
        (lambda: optax_prune.log_schedule(0.5, 1.5, steps_per_epoch=1), "interval_pass"),
        (lambda: optax_prune.log_schedule("0.5", steps_per_epoch=1), "sparsity_upper_bound"),
        (lambda: optax_prune.polynomial_schedule(0.5, begin_step=5, end_step=4, frequency=1), "begin_step"),
        (lambda: optax_prune.polynomial_schedule(0.5, begin_step=0, end_step=4, frequency=0), "frequency"),
        (lambda: optax_prune.polynomial_schedule(-0.1, begin_step=0, end_step=4, frequency=1), "final_sparsity"),
        (lambda: optax_prune.polynomial_schedule(0.5, begin_step=0, end_step=4, frequency=1, initial_sparsity=2), "initial_sparsity"),
        (lambda: optax_prune.polynomial_schedule(0.5, begin_step=0, end_step=4, frequency=1, power=0), "power"),
        (lambda: optax_prune.polynomial_schedule(0.5, begin_step=0, end_step=4, frequency=1, power=float("inf")), "`power` must be a finite number"),
        (lambda: optax_prune.polynomial_schedule(0.5, begin_step=-1, end_step=4, frequency=1), "begin_step"),
        (lambda: optax_prune.constant_schedule(1.01), "sparsity"),
        (lambda: optax_prune.constant_schedule(0.5, step=-1), "step"),
        (lambda: optax_prune.constant_schedule(True), "sparsity"),
    ],
)
def test_bad_schedule_arguments_raise_at_construction(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_mask_update_steps_lists_the_formulas_update_steps():
  # The hook's update epochs: multiples of interval_pass up to end_pass, and end_pass.
  log = optax_prune.log_schedule(0.9, 3, 10, steps_per_epoch=4)
  assert optax_prune.mask_update_steps(log, 60).tolist() == [0, 12, 24, 36, 40]
  poly = optax_prune.polynomial_schedule(0.8, begin_step=5, end_step=17, frequency=5)
  assert optax_prune.mask_update_steps(poly, 40).tolist() == [5, 10, 15, 17]
  # Any schedule of a pytree or of `by_path` rules; None prunes nothing.
  tree = {"a": log, "b": {"c": poly, "d": None}}
  assert optax_prune.mask_update_steps(tree, 20).tolist() == [0, 5, 10, 12, 15, 17]
  rules = optax_prune.by_path({"dense": 0.5}, default=poly)
  assert optax_prune.mask_update_steps(rules, 12).tolist() == [0, 5, 10]
  assert optax_prune.mask_update_steps(None, 12).tolist() == []
  assert optax_prune.mask_update_steps(0.3, 0).tolist() == []


def test_from_optax_schedule_clips_and_updates_from_begin_step_on():
  ramp = lambda step: 1.5 - step.astype(jnp.float32) / 100  # From 1.5 down past 0.
  schedule = optax_prune.from_optax_schedule(ramp, every=10, begin_step=25)
  assert [float(schedule(t).sparsity) for t in (0, 100, 200)] == [1.0, 0.5, 0.0]
  assert optax_prune.mask_update_steps(schedule, 60).tolist() == [25, 35, 45, 55]


@pytest.mark.parametrize("flag", [jnp.int32(1), jnp.float32(1.0)])
def test_a_schedule_whose_update_flag_is_not_a_bool_is_refused(flag):
  with pytest.raises(ValueError, match="must return a pair"):
    optax_prune.magnitude_pruning(lambda step: optax_prune.PruningTarget(jnp.float32(0.5), flag))


def test_mask_update_steps_rejects_bad_arguments():
  with pytest.raises(ValueError, match="`num_steps`"):
    optax_prune.mask_update_steps(0.5, -1)
  with pytest.raises(ValueError, match="`schedule`"):
    optax_prune.mask_update_steps(1.5, 10)
