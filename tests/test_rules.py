"""The mask update rules (``_rules``) on data built so that each documented
choice decides the result: one drop-and-grow update against the NumPy
reference (``regrow_dropped``, the cap on d, kept zeros, the clipped drop
fraction, a stack's layers), and nested ERK counts in gradual pruning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_prune
from tests import helpers
from tests import reference


def _one_update(tx, w, old, g):
  """The keep-mask after one mask update of ``tx`` (rigl) at step 1 from the
  keep-mask ``old`` (same pruned count as ``tx.init`` gives), params ``w``
  (zero where pruned) and gradient ``g``."""
  params, grads = {"w": jnp.asarray(w)}, {"w": jnp.asarray(g)}
  state = tx.init(params)
  masks = state.masks._replace(count=jnp.ones((), jnp.int32),  # Step 1: an update.
                               masks={"w": jnp.asarray(old)})
  _, state = jax.jit(tx.update)(grads, state._replace(masks=masks), params)
  return np.asarray(state.masks.masks["w"])


def _rigl(sparsity, fraction, regrow_dropped=True, **options):
  if not callable(fraction):
    fraction = optax.constant_schedule(fraction)
  return optax_prune.rigl(optax.sgd(0.1), sparsity, end_step=10, frequency=1,
                          drop_fraction=fraction, regrow_dropped=regrow_dropped,
                          distribution="uniform", **options)


def _dropped_with_top_gradients():
  """Kept 0..7, the two smallest (0, 1) with the largest |grad|."""
  w = np.zeros(16, np.float32)
  w[:8] = [0.1, 0.2, 3, 4, 5, 6, 7, 8]
  g = np.full(16, 0.5, np.float32)
  g[:2] = [10.0, 9.0]
  g[8:] = np.arange(1.0, 9.0)  # Pruned entries: 8..15.
  return w, np.arange(16) < 8, g


@pytest.mark.parametrize("regrow_dropped", [True, False])
def test_regrow_dropped_false_never_regrows_a_weight_dropped_at_the_step(regrow_dropped):
  # RigL regrows the dropped weights 0 and 1 at once (their gradients lead);
  # `regrow_dropped=False` must grow two entries pruned before instead.
  w, old, g = _dropped_with_top_gradients()
  new = _one_update(_rigl(0.5, 0.25, regrow_dropped), w.reshape(4, 4), old.reshape(4, 4),
                    g.reshape(4, 4)).reshape(-1)
  expected, dropped = reference.drop_and_grow(old, w, g, 0.25, regrow_dropped)
  np.testing.assert_array_equal(dropped, [0, 1])
  np.testing.assert_array_equal(new, expected)
  if regrow_dropped:
    np.testing.assert_array_equal(new, old)  # Dropped and regrown at once.
  else:
    assert not new[dropped].any()
    np.testing.assert_array_equal(np.flatnonzero(new), [2, 3, 4, 5, 6, 7, 14, 15])


def test_regrow_dropped_false_moves_at_most_the_entries_pruned_before():
  # 12 kept, 4 pruned, f = 0.5: d = 6 is capped at n - k = 4 (there are only
  # 4 entries to grow), so the count stays 12.
  w = np.zeros(16, np.float32)
  w[:12] = np.arange(1.0, 13.0)
  old = np.arange(16) < 12
  g = np.zeros(16, np.float32)
  g[12:] = [1.0, 2.0, 3.0, 4.0]
  new = _one_update(_rigl(0.25, 0.5, regrow_dropped=False), w.reshape(4, 4),
                    old.reshape(4, 4), g.reshape(4, 4)).reshape(-1)
  expected, _ = reference.drop_and_grow(old, w, g, 0.5, regrow_dropped=False)
  np.testing.assert_array_equal(np.flatnonzero(expected), np.arange(4, 16))
  np.testing.assert_array_equal(new, expected)


def test_kept_zeros_are_dropped_before_pruned_entries_are_touched():
  # Four kept weights are exactly 0 (grown weights start there): the two
  # dropped are kept zeros (by position), never entries already pruned.
  w = np.zeros(16, np.float32)
  w[4:8] = [1.0, 2.0, 3.0, 4.0]  # Kept: 0..7, of which 0..3 are 0.
  old = np.arange(16) < 8
  g = np.zeros(16, np.float32)
  g[8:] = np.arange(1.0, 9.0)
  new = _one_update(_rigl(0.5, 0.25), w.reshape(4, 4), old.reshape(4, 4),
                    g.reshape(4, 4)).reshape(-1)
  expected, dropped = reference.drop_and_grow(old, w, g, 0.25)
  np.testing.assert_array_equal(dropped, [0, 1])
  np.testing.assert_array_equal(np.flatnonzero(expected), [2, 3, 4, 5, 6, 7, 14, 15])
  np.testing.assert_array_equal(new, expected)


def test_a_drop_fraction_above_one_is_clipped_to_one():
  # f = 2 counts as 1: every kept weight is dropped and the 8 entries of
  # largest |grad| grown; the count stays exact.
  w, old, g = _dropped_with_top_gradients()
  new = _one_update(_rigl(0.5, lambda step: jnp.float32(2.0)), w.reshape(4, 4),
                    old.reshape(4, 4), g.reshape(4, 4)).reshape(-1)
  expected, _ = reference.drop_and_grow(old, w, g, 1.0)
  assert expected.sum() == 8
  np.testing.assert_array_equal(new, expected)


def test_each_layer_of_a_stack_drops_and_grows_its_own_count():
  # Layer 0 keeps 8 of 16, layer 1 keeps 12: at f = 0.3 each drops
  # round(f * its k), 2 (of 2.4) and 4 (of 3.6, not 3).
  w0, old0, g0 = _dropped_with_top_gradients()
  w1 = np.zeros(16, np.float32)
  w1[:12] = np.arange(12.0, 0.0, -1.0)  # Smallest kept last: 11, 10, 9, 8.
  old1 = np.arange(16) < 12
  g1 = np.arange(1.0, 17.0).astype(np.float32)
  w, old, g = (np.stack([a, b]).reshape(2, 4, 4) for a, b in ((w0, w1), (old0, old1), (g0, g1)))
  tx = _rigl(0.5, 0.3, layer_axis=0)
  params = {"w": jnp.asarray(w)}
  state = tx.init(params)
  assert state.masks.pruned_units.tolist() == [8, 8]
  # Layer 1 pruned 4 only: its state entry must say so.
  state = state._replace(masks=state.masks._replace(pruned_units=jnp.asarray([8, 4], jnp.int32)))
  masks = state.masks._replace(count=jnp.ones((), jnp.int32), masks={"w": jnp.asarray(old)})
  _, state = jax.jit(tx.update)({"w": jnp.asarray(g)}, state._replace(masks=masks), params)
  new = np.asarray(state.masks.masks["w"]).reshape(2, 16)
  for layer, (wl, ol, gl) in enumerate(((w0, old0, g0), (w1, old1, g1))):
    expected, dropped = reference.drop_and_grow(ol, wl, gl, 0.3)
    assert len(dropped) == (2, 4)[layer]
    np.testing.assert_array_equal(new[layer], expected, err_msg=f"layer {layer}")


def test_erk_counts_stay_nested_through_a_mask_update():
  # Channels of the three kernels: at 0.65625 ERK gives the conv kernel 7 of
  # its 8 channels and at 0.75 only 6 (tests/test_distributions.py); the
  # mask update must keep its 7 pruned channels pruned, the total exact.
  def schedule(step):
    sparsity = jnp.where(step == 0, 0.65625, 0.75).astype(jnp.float32)
    return optax_prune.PruningTarget(sparsity, step <= 1)

  tx = optax_prune.magnitude_pruning(schedule, granularity=optax_prune.channels(axis=-1),
                                     distribution="erk")
  params = helpers.params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update(params, state, params)
  first = {k: np.asarray(state.masks[k]["kernel"]) for k in ("conv", "dense", "out")}
  pruned_first = state.pruned_units.tolist()
  assert pruned_first[0] == 7
  _, state = update(params, state, params)
  later = {k: np.asarray(state.masks[k]["kernel"]) for k in first}
  for k in first:
    assert not (later[k] & ~first[k]).any(), f"{k}: a pruned channel came back"
  assert all(b >= a for a, b in zip(pruned_first, state.pruned_units.tolist()))
  assert sum(state.pruned_units.tolist()) == reference.prune_count(0.75, 8 + 16 + 8)


def test_coupled_channels_pruned_before_stay_pruned_when_kept_ones_are_zero():
  # Channel 3 is pruned at 0.25; then kept channels 0 and 1 become exactly 0.
  # At 0.5 two channels go: channel 3 (pruned before, it must stay so) and
  # channel 0 (a kept zero, by position), not channels 0 and 1.
  def schedule(step):
    sparsity = jnp.where(step == 0, 0.25, 0.5).astype(jnp.float32)
    return optax_prune.PruningTarget(sparsity, step <= 1)

  w1 = np.array([[1.0, 2.0, 3.0, 0.5]] * 3, np.float32)
  w2 = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [0.5, 0.5]], np.float32)
  params = {"a": {"kernel": jnp.asarray(w1)}, "b": {"kernel": jnp.asarray(w2)}}
  fn = lambda p, x: jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"]
  groups = optax_prune.channel_groups(fn, params, jnp.ones((2, 3)))
  tx = optax_prune.magnitude_pruning(schedule,
                                     granularity=optax_prune.coupled_channels(groups))
  update = jax.jit(tx.update)
  state = tx.init(params)
  updates, state = update(params, state, params)
  keep = lambda state: np.asarray(state.masks["a"]["kernel"]).any(axis=0)
  np.testing.assert_array_equal(keep(state), [True, True, True, False])
  params = optax.apply_updates(params, updates)
  params["a"]["kernel"] = params["a"]["kernel"].at[:, :2].set(0.0)
  params["b"]["kernel"] = params["b"]["kernel"].at[:2].set(0.0)
  _, state = update(params, state, params)
  np.testing.assert_array_equal(keep(state), [False, True, True, False])
