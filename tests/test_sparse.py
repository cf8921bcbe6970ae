"""Sparse training (RigL, SET, static, straight-through) against a NumPy
reference: drop and grow counts, ties by position, no same-step regrowth when
asked, grown weights at 0 with fresh moments, exact zeros, one compile."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_prune
from tests import helpers
from tests import reference

KERNELS = ("conv", "dense", "out")
# Mask updates at 3, 6 and 9; none at end_step (12, a multiple of the
# frequency) or at 15: masks are frozen from end_step on.
FREQUENCY, END_STEP, STEPS = 3, 12, 16
LR = 0.05


def _params():
  # Weights on a grid of 0.5: many ties, broken by position.
  return jax.tree.map(lambda x: jnp.round(x * 2) / 2, helpers.params())


def _kernel_masks(state):
  masks = optax_prune.find_pruning_state(state).masks
  return {k: np.asarray(masks[k]["kernel"]) for k in KERNELS}


@pytest.mark.parametrize("method,regrow_dropped", [
    ("rigl", True), ("rigl", False), ("set", True)])
def test_drop_and_grow_matches_the_numpy_reference(method, regrow_dropped):
  make = {"rigl": optax_prune.rigl, "set": optax_prune.set_training}[method]
  # A constant fraction, so that an update after end_step would move masks
  # (the cosine one is 0 there); the run passes multiples of the frequency
  # at and after end_step.
  fraction = 0.25
  assert [t for t in range(END_STEP, STEPS) if t % FREQUENCY == 0] == [12, 15]
  tx = make(optax.adam(LR), 0.8, end_step=END_STEP, frequency=FREQUENCY,
            drop_fraction=optax.constant_schedule(fraction), regrow_dropped=regrow_dropped,
            seed=3)
  params = _params()
  state = tx.init(params)
  masks = _kernel_masks(state)
  total = sum(m.size for m in masks.values())
  counts = {k: int((~m).sum()) for k, m in masks.items()}
  assert sum(counts.values()) == reference.prune_count(0.8, total)  # ERK, exact.
  moved = 0
  for t, before, state, after in helpers.train(tx, params, STEPS):
    new = _kernel_masks(state)
    grads = jax.grad(helpers.loss)(before)
    for index, k in zip((1, 3, 5), KERNELS):  # Flat leaf indices of the kernels.
      if method == "rigl":
        grow = np.asarray(grads[k]["kernel"])
      else:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), t), index)
        grow = np.asarray(jax.random.uniform(key, masks[k].shape))
      if t % FREQUENCY == 0 and 0 < t < END_STEP:
        expected, dropped = reference.drop_and_grow(
            masks[k], np.asarray(before[k]["kernel"]), grow, fraction, regrow_dropped)
        np.testing.assert_array_equal(new[k].reshape(-1), expected, err_msg=f"{k} at {t}")
        if not regrow_dropped:
          assert not new[k].reshape(-1)[dropped].any()
        moved += int((new[k] & ~masks[k]).sum())
      else:
        np.testing.assert_array_equal(new[k], masks[k])
      assert int((~new[k]).sum()) == counts[k]  # The sparsity never drifts.
      out = np.asarray(after[k]["kernel"])
      assert np.all(out[~new[k]] == 0)
      grown = new[k] & ~masks[k]
      assert np.all(out[grown] == 0)  # Grown weights start at exactly 0.
      adam = state.inner_state[0]  # Their Adam moments restart from init: 0.
      for moment in (adam.mu, adam.nu):
        assert np.all(np.asarray(moment[k]["kernel"])[grown] == 0)
      if t == 0:  # The inner optimizer sees no gradient at pruned entries.
        g = np.asarray(grads[k]["kernel"])
        np.testing.assert_allclose(np.asarray(adam.mu[k]["kernel"]),
                                   np.where(masks[k], np.float32(0.1) * g, 0), rtol=1e-6)
    masks = new
  assert moved > 0
  pruned = optax_prune.find_pruning_state(state).pruned_units
  assert sorted(np.asarray(pruned).tolist()) == sorted(counts.values())


def test_grown_weights_start_with_fresh_momentum():
  # SGD with momentum: a grown weight's first update must be -lr * g, not
  # driven by the trace it had before it was dropped.
  tx = optax_prune.rigl(optax.sgd(LR, momentum=0.9), 0.7, end_step=END_STEP,
                        frequency=FREQUENCY, drop_fraction=0.5)
  stale_seen, checked = False, 0
  old = previous_trace = grown = None
  for t, before, state, after in helpers.train(tx, _params(), STEPS):
    trace = state.inner_state[0].trace
    if grown is not None:
      grads = jax.grad(helpers.loss)(before)
      for k in KERNELS:
        g = grown[k]
        np.testing.assert_array_equal(
            np.asarray(after[k]["kernel"])[g],
            np.float32(-LR) * np.asarray(grads[k]["kernel"])[g])
        checked += int(g.sum())
      grown = None
    masks = _kernel_masks(state)
    if t % FREQUENCY == 0 and 0 < t < END_STEP:
      grown = {k: masks[k] & ~old[k] for k in KERNELS}
      for k in KERNELS:
        assert np.all(np.asarray(trace[k]["kernel"])[grown[k]] == 0)  # Reset.
        stale_seen |= bool(np.any(np.asarray(previous_trace[k]["kernel"])[grown[k]] != 0))
    old, previous_trace = masks, trace
  assert stale_seen and checked > 0  # Some grown weights had a stale trace.


def test_cosine_drop_fraction_and_frozen_masks():
  # 200 of 400 kept; updates at 4 (f = 0.15 (1 + cos(pi/2)) = 0.15: 30 move)
  # and none from end_step = 8 on. Without same-step regrowth every grown
  # weight is new, so exactly d move.
  tx = optax_prune.rigl(optax.sgd(LR), 0.5, end_step=8, frequency=4, drop_fraction=0.3,
                        regrow_dropped=False, distribution="uniform")
  params = {"w": jax.random.normal(jax.random.key(1), (20, 20))}
  old, moved = None, {}
  for t, _, state, _ in helpers.train(tx, params, 13):
    mask = np.asarray(optax_prune.find_pruning_state(state).masks["w"])
    if old is not None:
      moved[t] = int((mask & ~old).sum())
    old = mask
  expected = round(0.15 * (1 + np.cos(np.pi * 4 / 8)) * 200)
  assert moved == {t: expected if t == 4 else 0 for t in range(1, 13)}


INNER_OPTIMIZERS = {
    "adamw": lambda: optax.adamw(LR, weight_decay=0.1),
    "clip-adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR)),
    "adafactor": lambda: optax.adafactor(LR, min_dim_size_to_factor=8),
    "multi_transform": lambda: optax.multi_transform(
        {"a": optax.adam(LR), "s": optax.sgd(LR, momentum=0.9)},
        {"conv": "s", "dense": "a", "out": "a"}),
    "masked": lambda: optax.chain(optax.masked(optax.adam(LR), {"conv": True, "dense": False,
                                                                "out": True}),
                                  optax.sgd(LR)),
}


@pytest.mark.parametrize("name", list(INNER_OPTIMIZERS))
def test_any_inner_optimizer_keeps_its_state_layout(name):
  # The reset of grown entries touches only params-shaped leaves of the
  # params' shape (not Adafactor's factored moments, not MaskedNodes).
  tx = optax_prune.rigl(INNER_OPTIMIZERS[name](), 0.8, end_step=6, frequency=2)
  params = helpers.params()
  layout = lambda tree: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)
  first = layout(tx.init(params))
  for _, _, state, after in helpers.train(tx, params, 5):  # Updates at 2 and 4.
    assert layout(state) == first
    masks = _kernel_masks(state)
    for k in KERNELS:
      assert np.all(np.asarray(after[k]["kernel"])[~masks[k]] == 0)


def test_static_sparse_masks_are_fixed_random_and_exact():
  params = helpers.params()
  tx = optax.chain(optax.adamw(LR), optax_prune.static_sparse(0.8, seed=1))
  first = None
  for _, _, state, after in helpers.train(tx, params, 6):
    masks = _kernel_masks(state)
    first = first or masks
    for k in KERNELS:
      np.testing.assert_array_equal(masks[k], first[k])
      assert np.all(np.asarray(after[k]["kernel"])[~masks[k]] == 0)
  total = sum(m.size for m in first.values())
  assert sum(int((~m).sum()) for m in first.values()) == reference.prune_count(0.8, total)
  other = _kernel_masks(optax_prune.static_sparse(0.8, seed=2).init(params))
  assert any((other[k] != first[k]).any() for k in KERNELS)
  # Random units of any granularity: half of the 128 groups of 4 made 2:4.
  nm = optax_prune.static_sparse(0.5, granularity=optax_prune.n_of_m(2, 4, axis=-2))
  kept = np.asarray(nm.init(params).masks["dense"]["kernel"]).reshape(8, 4, 16).sum(1)
  assert sorted(np.unique(kept, return_counts=True)[1].tolist()) == [64, 64]
  assert set(np.unique(kept).tolist()) == {2, 4}


@pytest.mark.parametrize("score", ["random", "saliency"])
def test_straight_through_ranks_every_score_afresh(score):
  # Pruned entries are not scored 0: with a new random draw (or |w * g| on
  # the dense weights) at each update, entries pruned before come back.
  schedule = optax_prune.polynomial_schedule(0.5, begin_step=0, end_step=6, frequency=1,
                                             initial_sparsity=0.5)
  tx = optax.chain(optax.sgd(0.1), optax_prune.straight_through(
      schedule, score=score, distribution="uniform"))
  returned = 0
  old = None
  for _, _, state, _ in helpers.train(tx, helpers.params(), 6):
    mask = np.asarray(state[1].masks.masks["dense"]["kernel"])
    assert int((~mask).sum()) == 256
    if old is not None:
      returned += int((mask & ~old).sum())
    old = mask
  assert returned > 0


def test_straight_through_trains_dense_weights_and_lets_them_return():
  schedule = optax_prune.polynomial_schedule(0.5, begin_step=0, end_step=4, frequency=2)
  tx = optax.chain(optax.sgd(1.0), optax_prune.straight_through(
      schedule, distribution="uniform"))
  params = {"w": jnp.array([[0.1, -2.0], [0.3, 4.0]])}
  state = tx.init(params)
  dense = np.asarray(params["w"])
  returned = False
  for t in range(6):
    # Push the first entry up: pruned at step 0, it must come back by magnitude.
    grads = {"w": jnp.array([[-3.0, 0.0], [0.0, 0.0]])}
    updates, state = tx.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    mask = np.asarray(state[1].masks.masks["w"])
    if t in (0, 2, 4):  # Ranked on the dense weights before the step.
      np.testing.assert_array_equal(mask, reference.keep_masks(
          [dense], float(schedule(t).sparsity))[0])
    dense = dense - np.asarray(grads["w"])  # The gradient reaches the dense weights.
    np.testing.assert_allclose(np.asarray(state[1].dense["w"]), dense, rtol=1e-6)
    out = np.asarray(new_params["w"])
    assert np.all(out[~mask] == 0)
    np.testing.assert_allclose(out[mask], dense[mask], rtol=1e-6)
    returned |= bool(mask[0, 0])
    params = new_params
  assert returned


@pytest.mark.parametrize("call,match", [
    (lambda: optax_prune.rigl(optax.adam(1e-3), 0.8, end_step=10,
                              granularity=optax_prune.n_of_m(2, 4, axis=0)), "granularity"),
    (lambda: optax_prune.rigl(optax.adam(1e-3), 1.5, end_step=10), "sparsity"),
    (lambda: optax_prune.rigl(optax.adam(1e-3), 0.8, end_step=-1), "end_step"),
    (lambda: optax_prune.set_training(optax.adam(1e-3), 0.8, end_step=9, frequency=0),
     "frequency"),
    (lambda: optax_prune.rigl(optax.adam(1e-3), 0.8, end_step=10, drop_fraction="x"),
     "drop_fraction"),
    (lambda: optax_prune.rigl(optax.adam(1e-3), 0.8, end_step=10,
                              drop_fraction=lambda s: (s, s)), "drop_fraction"),
    (lambda: optax_prune.rigl("adam", 0.8, end_step=10), "inner"),
    (lambda: optax_prune.rigl(optax.adam(1e-3), 0.8, end_step=10, regrow_dropped=1),
     "regrow_dropped"),
    (lambda: optax_prune.static_sparse(-0.1), "sparsity"),
])
def test_bad_arguments_name_themselves(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_the_wrapper_takes_grads_as_a_keyword_too():
  # The chained links' `update(..., grads=grads)` convention reaches a wrapper
  # in a chain as well; its first argument already is the gradient.
  params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
  tx = optax.chain(optax_prune.rigl(optax.adam(LR), 0.5, end_step=10, frequency=1))
  state = tx.init(params)
  a = tx.update(params, state, params)
  b = tx.update(params, state, params, grads=params)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_updates_without_params_are_a_clear_error():
  params = {"w": jnp.ones((4, 4))}
  for tx in (optax_prune.rigl(optax.adam(1e-3), 0.5, end_step=10),
             optax_prune.straight_through(0.5)):
    with pytest.raises(ValueError, match="needs them"):
      tx.update(params, tx.init(params))


@pytest.mark.parametrize("make", [optax_prune.rigl, optax_prune.set_training])
def test_wrapper_misuses_name_the_fix(make):
  # Chained after another optimizer (`inner` is the identity): a warning.
  with pytest.warns(UserWarning, match=r"`inner` is `optax.identity\(\)`.*must own the optimizer"):
    make(optax.identity(), 0.5, end_step=10)
  # Wrapping MultiSteps: the other way round.
  with pytest.raises(ValueError, match=r"wrap it the other way round, `optax.MultiSteps\("):
    make(optax.MultiSteps(optax.adam(1e-3), 2), 0.5, end_step=10)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    make(optax.adam(1e-3), 0.5, end_step=10)
