"""optax wrappers around or beside the pruning transformation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_prune
from tests import reference


def _params():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
          "v": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(6), jnp.float32)}


def _grads(params, scale=1.0):
  return jax.tree.map(lambda p: scale * jnp.cos(p), params)


def _step_fn(tx):
  @jax.jit
  def step(params, state, scale):
    updates, state = tx.update(_grads(params, scale), state, params)
    return optax.apply_updates(params, updates), state
  return step


def test_multi_steps_advances_masks_with_real_optimizer_steps():
  schedule = optax_prune.polynomial_schedule(0.75, begin_step=0, end_step=4, frequency=2)
  tx = optax.MultiSteps(optax.chain(optax.sgd(0.1), optax_prune.magnitude_pruning(schedule, distribution="uniform")),
                        every_k_schedule=3)
  params, state = _params(), None
  state = tx.init(params)
  step = _step_fn(tx)
  for micro in range(18):
    params, state = step(params, state, 1.0)
    pstate = optax_prune.find_pruning_state(state)
    assert int(pstate.count) == (micro + 1) // 3  # Only real steps count.
  for name in ("w", "v"):
    mask = np.asarray(pstate.masks[name])
    assert (~mask).sum() == reference.prune_count(0.75, mask.size)
    assert np.all(np.asarray(params[name])[~mask] == 0.0)


def test_inject_hyperparams_beside_pruning():
  tx = optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=0.1),
                   optax_prune.magnitude_pruning(0.5, distribution="uniform"))
  params = _params()
  state = tx.init(params)
  state[0].hyperparams["learning_rate"] = jnp.asarray(0.01)
  params, state = _step_fn(tx)(params, state, 1.0)
  mask = np.asarray(optax_prune.find_pruning_state(state).masks["w"])
  assert (~mask).sum() == 24 and np.all(np.asarray(params["w"])[~mask] == 0)


def test_apply_if_finite_skips_the_schedule_on_bad_steps():
  schedule = optax_prune.polynomial_schedule(0.5, begin_step=1, end_step=1, frequency=1)
  tx = optax.apply_if_finite(
      optax.chain(optax.sgd(0.1), optax_prune.magnitude_pruning(schedule, distribution="uniform")), 5)
  params = _params()
  state = tx.init(params)
  step = _step_fn(tx)
  params, state = step(params, state, 1.0)  # Real step 0: nothing pruned yet.
  before = params
  params, state = step(params, state, jnp.nan)  # Skipped: count stays at 1.
  chex_equal = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), before, params)
  assert all(jax.tree.leaves(chex_equal))
  pstate = optax_prune.find_pruning_state(state)
  assert int(pstate.count) == 1 and bool(jnp.all(pstate.masks["w"]))
  params, state = step(params, state, 1.0)  # Real step 1: the mask update.
  pstate = optax_prune.find_pruning_state(state)
  assert int(pstate.count) == 2 and int((~pstate.masks["w"]).sum()) == 24


def test_multi_transform_and_masked_prune_only_their_part():
  params = _params()
  labels = {"w": "pruned", "v": "dense", "b": "dense"}
  tx = optax.multi_transform(
      {"pruned": optax.chain(optax.adam(0.1), optax_prune.magnitude_pruning(0.5)),
       "dense": optax.sgd(0.1)}, labels)
  new, _ = _step_fn(tx)(params, tx.init(params), 1.0)
  assert int((np.asarray(new["w"]) == 0).sum()) == 24
  assert int((np.asarray(new["v"]) == 0).sum()) == 0
  masked = optax.chain(optax.sgd(0.1), optax.masked(
      optax_prune.magnitude_pruning(0.5), {"w": False, "v": True, "b": False}))
  new, state = _step_fn(masked)(params, masked.init(params), 1.0)
  assert int((np.asarray(new["v"]) == 0).sum()) == 10
  assert int((np.asarray(new["w"]) == 0).sum()) == 0
