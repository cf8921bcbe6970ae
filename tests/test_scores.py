"""Scores beyond magnitude: saliency, random (seeded, reproducible), custom."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_prune
from tests import reference


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32),
          "v": jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32)}


def _first_masks(tx, params, updates, count=0):
  state = tx.init(params)._replace(count=jnp.int32(count))
  return jax.jit(tx.update)(updates, state, params)[1].masks


def test_saliency_ranks_by_weight_times_update():
  params, updates = _params(0), _params(1)
  masks = _first_masks(optax_prune.magnitude_pruning(0.6, score="saliency", distribution="uniform"), params, updates)
  for k in params:
    product = np.asarray(params[k]) * np.asarray(updates[k])
    np.testing.assert_array_equal(masks[k], reference.keep_masks([product], 0.6)[0])
  # Not the magnitude mask.
  assert not np.array_equal(masks["w"], reference.keep_masks([np.asarray(params["w"])], 0.6)[0])


def test_saliency_ranks_by_the_raw_gradient_when_update_is_given_it():
  # Under Adam the link receives Adam's step (about -lr * sign(g)), so
  # |w * u| is nearly the magnitude mask; `grads=` restores |w * g|, through
  # `optax.chain` as through any other link.
  params, grads = _params(0), jax.tree.map(lambda x: x ** 3, _params(1))
  tx = optax.chain(optax.adam(0.1), optax_prune.magnitude_pruning(
      0.6, score="saliency", distribution="uniform"))
  with_grads = jax.jit(lambda s: tx.update(grads, s, params, grads=grads))(tx.init(params))
  without = jax.jit(lambda s: tx.update(grads, s, params))(tx.init(params))
  masks = optax_prune.find_pruning_state(with_grads[1]).masks
  adam_masks = optax_prune.find_pruning_state(without[1]).masks
  for k in params:
    product = np.asarray(params[k]) * np.asarray(grads[k])
    np.testing.assert_array_equal(masks[k], reference.keep_masks([product], 0.6)[0])
  assert not np.array_equal(masks["w"], adam_masks["w"])
  with pytest.raises(ValueError, match="`grads` must have the structure of `params`"):
    tx.update(grads, tx.init(params), params, grads={"w": grads["w"]})


def test_random_is_exact_seeded_and_reproducible():
  params = _params()
  schedule = optax_prune.constant_schedule(0.7, step=5)
  # (Each seed compiles once: random bits are slow to compile on CPU.)
  tx = optax_prune.magnitude_pruning(schedule, score="random", seed=1, distribution="uniform")
  a = _first_masks(tx, params, params, count=5)
  for k in params:
    assert int((~a[k]).sum()) == reference.prune_count(0.7, params[k].size)
  other = _first_masks(
      optax_prune.magnitude_pruning(schedule, score="random", seed=2, distribution="uniform"), params, params, count=5)
  assert not np.array_equal(a["w"], other["w"])  # Another seed: another mask.
  # Independent of the weights (a random mask, not a magnitude one), and the
  # same for the same seed and step.
  flipped = _first_masks(tx, jax.tree.map(lambda x: -x * 3, params), params, count=5)
  jax.tree.map(np.testing.assert_array_equal, a, flipped)


def test_random_keys_come_from_seed_step_and_leaf_so_a_resume_draws_the_same():
  # The key of leaf i at step t is fold_in(fold_in(key(seed), t), i), and
  # entries pruned before score 0: recomputed here from that rule alone.
  params = _params()
  names = sorted(params)  # Leaf order: "v" (index 0), then "w" (index 1).
  schedule = optax_prune.polynomial_schedule(0.8, begin_step=0, end_step=6, frequency=3)
  tx = optax_prune.magnitude_pruning(schedule, score="random", seed=7, distribution="uniform")
  step = jax.jit(lambda s: tx.update(params, s, params)[1])
  state, states = tx.init(params), []
  for _ in range(7):
    state = step(state)
    states.append(state)
  expected = {k: np.ones(params[k].shape, bool) for k in names}
  for t in (0, 3, 6):
    for i, k in enumerate(names):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), t), i)
      scores = np.where(expected[k], np.asarray(jax.random.uniform(key, params[k].shape)), 0)
      expected[k] = reference.keep_masks([scores], float(schedule(t).sparsity))[0]
      np.testing.assert_array_equal(states[t].masks[k], expected[k])
  # A state saved after step 2 and restored (host copies) continues the same.
  resumed = jax.tree.map(lambda x: jnp.array(np.asarray(x)), states[2])
  for _ in range(4):
    resumed = step(resumed)
  jax.tree.map(np.testing.assert_array_equal, resumed.masks, states[-1].masks)


def test_a_custom_score_plugs_in():
  # Prune the entries nearest to 1.0 first: a score of the user's own.
  def distance_to_one(param, update, key):
    del update, key
    return param - 1.0

  params = _params()
  masks = _first_masks(optax_prune.magnitude_pruning(0.5, score=distance_to_one, distribution="uniform"), params, params)
  for k in params:
    expected = reference.keep_masks([np.asarray(params[k]) - np.float32(1.0)], 0.5)[0]
    np.testing.assert_array_equal(masks[k], expected)


def test_scores_compose_with_granularity():
  params, updates = _params(0), _params(1)
  tx = optax_prune.magnitude_pruning(
      0.5, score="saliency", granularity=optax_prune.channels(norm="l1"))
  masks = _first_masks(tx, params, updates)
  product = np.asarray(params["w"]) * np.asarray(updates["w"])
  np.testing.assert_array_equal(masks["w"], reference.channel_masks(product, 0.5, -1, "l1"))


@pytest.mark.parametrize("score,match", [
    ("taylor", "`score` must be one of"),
    (lambda p, u, k: p.sum(), "floating array of the leaf's shape"),
    (lambda p, u, k: p.astype(jnp.int32), "floating array"),
    (lambda p: p, "`score` failed on leaf"),
])
def test_bad_scores_are_clear_errors_before_jit(score, match):
  with pytest.raises(ValueError, match=match):
    optax_prune.magnitude_pruning(0.5, score=score).init(_params())


def test_bad_seed_is_refused():
  with pytest.raises(ValueError, match="`seed`"):
    optax_prune.magnitude_pruning(0.5, score="random", seed=1.5)
  with pytest.raises(ValueError, match=r"`seed` must be an integer in \[-9223372036854775808,"):
    optax_prune.magnitude_pruning(0.5, score="random", seed=2**70)
