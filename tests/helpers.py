"""Small shared test helpers: params, a loss whose gradients never vanish, a
jitted training loop that proves it compiled once, and unit counts read from
masks in NumPy (independently of the library's granularity code)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_prune


def params(seed=0, dtype=jnp.float32, twin=False, stack=False):
  """A small CNN's params: kernels of 4-D and 2-D, biases of 1-D.

  With ``twin``, one more layer of the dense layer's shapes, last in leaf
  order: lone leaves of one shape are ranked by one kernel in a loop
  (``_thresholds.masks_of_alike_leaves``), which the contract battery runs.
  With ``stack``, a scanned stack of 3 such layers (``"stack"``, kernel
  ``(3, 32, 16)`` and bias ``(3, 16)``, before ``"twin"``), for
  ``layer_axis=STACKED``.
  """
  rng = np.random.default_rng(seed)
  tree = {
      "conv": {"kernel": rng.standard_normal((3, 3, 4, 8)), "bias": rng.standard_normal(8)},
      "dense": {"kernel": rng.standard_normal((32, 16)), "bias": rng.standard_normal(16)},
      "out": {"kernel": rng.standard_normal((16, 8)), "bias": rng.standard_normal(8)},
  }
  if twin:
    tree["twin"] = {"kernel": rng.standard_normal((32, 16)), "bias": rng.standard_normal(16)}
  if stack:
    tree["stack"] = {"kernel": rng.standard_normal((3, 32, 16)),
                     "bias": rng.standard_normal((3, 16))}
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


# The layer axis of `params(stack=True)`.
STACKED = optax_prune.by_path({r"\['stack'\]": 0}, default=None)


def loss(tree):
  # Gradients that never vanish, so optimizers keep pushing every weight.
  return sum(jnp.sum(jnp.sin(x.astype(jnp.float32)) + 0.1 * x.astype(jnp.float32))
             for x in jax.tree.leaves(tree))


def make_step(tx, jit=True, traces=None):
  """``step(params, state, update_masks=None) -> (params, state)`` with
  gradients of :func:`loss`; ``update_masks`` is static under ``jit``."""

  def step(p, state, update_masks=None):
    if traces is not None:
      traces.append(update_masks)
    grads = jax.grad(loss)(p)
    grads = jax.tree.map(lambda g, x: g.astype(x.dtype), grads, p)
    extra = {} if update_masks is None else {"update_masks": update_masks}
    updates, state = tx.update(grads, state, p, **extra)
    return optax.apply_updates(p, updates), state

  return jax.jit(step, static_argnames="update_masks") if jit else step


def train(tx, p, steps, jit=True, due_steps=None):
  """Yields ``(step, params_before, state_after, params_after)``.

  With ``due_steps`` (the steps that update masks), each step passes
  ``update_masks=step in due_steps``: two compiled steps, with and without
  the mask update. The jitted step compiles once per kind of step.
  """
  traces = []
  step = make_step(tx, jit, traces)
  state = tx.init(p)
  for t in range(steps):
    flag = None if due_steps is None else bool(t in due_steps)
    new_p, state = step(p, state, update_masks=flag)
    yield t, p, state, new_p
    p = new_p
  if jit:
    assert len(traces) == len(set(traces)), "the train step recompiled"


def pruned_units(granularity, mask):
  """How many units of ``granularity`` the keep-``mask`` prunes (NumPy)."""
  mask = np.asarray(mask)
  if granularity is None or isinstance(granularity, type(optax_prune.unstructured())):
    return int((~mask).sum())
  if isinstance(granularity, type(optax_prune.n_of_m(axis=0))):
    groups = np.moveaxis(mask, granularity.axis, -1)
    groups = groups.reshape(-1, granularity.m)
    return int((groups.sum(-1) < granularity.m).sum())  # Made N:M-sparse.
  if isinstance(granularity, type(optax_prune.channels())):
    slices = np.moveaxis(mask, granularity.axis, 0).reshape(mask.shape[granularity.axis], -1)
    return int((~slices.any(-1)).sum())
  bh, bw = granularity.shape
  h, w = mask.shape[-2:]
  count = 0
  for lead in itertools.product(*map(range, mask.shape[:-2])):
    for i in range(0, h, bh):
      for j in range(0, w, bw):
        count += not mask[lead][i:i + bh, j:j + bw].any()
  return count


def units(granularity, shape):
  """How many units a leaf of ``shape`` holds (NumPy)."""
  return pruned_units(granularity, np.zeros(shape, bool))


def all_pairs(factors, allowed=lambda config: True):
  """A small set of configurations that covers every allowed pair of values.

  ``factors`` maps names to value lists. Greedy: repeatedly takes the allowed
  configuration of the full product that covers the most uncovered pairs.
  """
  names = list(factors)
  candidates = [dict(zip(names, values)) for values in itertools.product(
      *(range(len(factors[n])) for n in names))]
  candidates = [c for c in candidates if allowed({n: factors[n][i] for n, i in c.items()})]
  pairs = lambda c: {(a, c[a], b, c[b]) for a, b in itertools.combinations(names, 2)}
  uncovered = set().union(*map(pairs, candidates))
  chosen = []
  while uncovered:
    best = max(candidates, key=lambda c: len(pairs(c) & uncovered))
    chosen.append({n: factors[n][i] for n, i in best.items()})
    uncovered -= pairs(best)
  return chosen
