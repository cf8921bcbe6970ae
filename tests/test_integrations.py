"""optax_prune inside flax: linen `TrainState` and `nnx.Optimizer`, jitted."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_prune
from tests import reference

SCHEDULE = optax_prune.polynomial_schedule(0.8, begin_step=0, end_step=20, frequency=5)


def _data():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.standard_normal((32, 12)), jnp.float32), jnp.asarray(rng.integers(0, 3, 32))


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


def test_linen_train_state_prunes_exactly_and_compiles_once():
  x, y = _data()
  model = LinenMLP()
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), optax_prune.magnitude_pruning(SCHEDULE, distribution="uniform"))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  traces = []

  @jax.jit
  def step(state):
    traces.append(1)
    grads = jax.grad(lambda p: _loss(state.apply_fn({"params": p}, x), y))(state.params)
    return state.apply_gradients(grads=grads)

  for t in range(30):
    before = state.params
    state = step(state)
    pstate = optax_prune.find_pruning_state(state.opt_state)
    if bool(SCHEDULE(t).update):
      for name in ("Dense_0", "Dense_1"):
        expected = reference.keep_masks([np.asarray(before[name]["kernel"])], SCHEDULE(t).sparsity)[0]
        np.testing.assert_array_equal(pstate.masks[name]["kernel"], expected)
    for name in ("Dense_0", "Dense_1"):
      kernel = np.asarray(state.params[name]["kernel"])
      assert np.all(kernel[~np.asarray(pstate.masks[name]["kernel"])] == 0.0)
  assert len(traces) == 1
  summary = optax_prune.sparsity_summary(state.params, pstate.masks)
  assert summary.masked_sparsity == (round(0.8 * 192) + round(0.8 * 48)) / 240


class NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(12, 16, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


@pytest.mark.parametrize("mask_step", ["in-step", "static"])
def test_nnx_optimizer_prunes_exactly_under_nnx_jit(mask_step):
  # "static": `update_masks` passes through `nnx.Optimizer.update` and the
  # chain; the mask-update step compiles apart from the others.
  due = set(optax_prune.mask_update_steps(SCHEDULE, 30).tolist())
  x, y = _data()
  model = NNXMLP(nnx.Rngs(0))
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), optax_prune.magnitude_pruning(SCHEDULE, distribution="uniform"))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  traces = []

  @nnx.jit(static_argnames="update_masks")
  def step(model, optimizer, update_masks=None):
    traces.append(1)
    grads = nnx.grad(lambda m: _loss(m(x), y))(model)
    optimizer.update(model, grads, update_masks=update_masks)

  for t in range(30):
    before = np.asarray(model.hidden.kernel[...])
    step(model, optimizer, update_masks=(t in due) if mask_step == "static" else None)
    pstate = optax_prune.find_pruning_state(nnx.as_pure(optimizer.opt_state))
    mask = np.asarray(pstate.masks["hidden"]["kernel"])
    if bool(SCHEDULE(t).update):
      np.testing.assert_array_equal(mask, reference.keep_masks([before], SCHEDULE(t).sparsity)[0])
    assert np.all(np.asarray(model.hidden.kernel[...])[~mask] == 0.0)
  assert len(traces) == (1 if mask_step == "in-step" else 2)
  assert int(pstate.skipped_mask_updates) == 0
  params = nnx.state(model, nnx.Param)
  summary = optax_prune.sparsity_summary(params, pstate.masks)
  paths = [r.path for r in summary.rows]
  assert any("hidden" in p and "kernel" in p for p in paths)
  assert summary.masked_sparsity == (round(0.8 * 192) + round(0.8 * 48)) / 240


SPARSE_TRAINING = {
    "rigl": lambda: optax_prune.rigl(optax.adam(1e-2), 0.8, end_step=10, frequency=4),
    "set": lambda: optax_prune.set_training(optax.sgd(0.1, momentum=0.9), 0.8, end_step=10,
                                            frequency=4),
    "static": lambda: optax.chain(optax.adam(1e-2), optax_prune.static_sparse(0.8)),
    "ste": lambda: optax.chain(optax.adam(1e-2), optax_prune.straight_through(0.8)),
}


@pytest.mark.parametrize("method", list(SPARSE_TRAINING))
def test_sparse_training_in_train_state_and_nnx_optimizer(method):
  # The wrappers own the optimizer and take the raw gradient, as `apply_gradients`
  # and `nnx.Optimizer.update` give it; the masked weights stay exactly 0.
  x, y = _data()
  linen = LinenMLP()
  state = train_state.TrainState.create(
      apply_fn=linen.apply, params=linen.init(jax.random.key(0), x)["params"],
      tx=SPARSE_TRAINING[method]())
  model = NNXMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, SPARSE_TRAINING[method](), wrt=nnx.Param)
  traces = []

  @jax.jit
  def linen_step(state):
    traces.append("linen")
    grads = jax.grad(lambda p: _loss(state.apply_fn({"params": p}, x), y))(state.params)
    return state.apply_gradients(grads=grads)

  @nnx.jit
  def nnx_step(model, optimizer):
    traces.append("nnx")
    optimizer.update(model, nnx.grad(lambda m: _loss(m(x), y))(model))

  for _ in range(12):
    state = linen_step(state)
    nnx_step(model, optimizer)
  assert sorted(traces) == ["linen", "nnx"]
  linen_masks = optax_prune.find_pruning_state(state.opt_state).masks
  nnx_masks = optax_prune.find_pruning_state(nnx.as_pure(optimizer.opt_state)).masks
  for kernel, mask in ((state.params["Dense_0"]["kernel"], linen_masks["Dense_0"]["kernel"]),
                       (model.hidden.kernel[...], nnx_masks["hidden"]["kernel"])):
    mask = np.asarray(mask)
    assert np.all(np.asarray(kernel)[~mask] == 0.0)
  summary = optax_prune.sparsity_summary(state.params, state.opt_state)
  assert summary.pruned == round(0.8 * 240) and "WARNING" not in str(summary)
