"""What ranks the weights: magnitude, saliency, random, or a score of your own.

A score maps one leaf to an array of its shape; entries (or units, see
``_granularity``) with the smallest ``|score|`` are pruned first. The
signature is ``score(param, update, key) -> array``: ``update`` is the raw
gradient where the transformation is given it (``tx.update(..., grads=grads)``,
or a wrapper that owns the optimizer), and otherwise what the pruning
transformation receives (the last link of the chain: with plain SGD that is
``-lr * grad``, with Adam Adam's step); ``key`` a PRNG key derived
from ``seed``, the step count and the leaf's position (:func:`step_key`,
:func:`leaf_key`), so a resumed run draws the same numbers.

A score is held as a :class:`Score`: the function and what is special about
it, so the mask update never asks which score it runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from optax_prune import _checks

SCORES = ("magnitude", "saliency", "random")
ScoreFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def magnitude(param, update, key):
  """``|w|``: the classic criterion."""
  del update, key
  return param


def saliency(param, update, key):
  """``|w * g|``: first-order estimate of the loss change from removing ``w``
  (``g`` the raw gradient where given, else the update the link receives)."""
  del key
  dtype = jnp.promote_types(param.dtype, jnp.float32)
  return param.astype(dtype) * update.astype(dtype)


def random(param, update, key):
  """Uniform random scores: a random mask of the exact size (a baseline)."""
  del update
  return jax.random.uniform(key, param.shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Score:
  """A score function and what the mask update needs to know about it."""

  fn: ScoreFn
  # Whether an entry pruned at the last update already scores 0 (its weight
  # is exactly 0 after `apply_updates`, and so is |w|). Other scores are
  # zeroed at pruned entries, so that masks stay nested as the sparsity rises
  # (a new random draw would otherwise bring pruned weights back).
  zero_when_pruned: bool = False

  def __call__(self, param, update, old_mask, key) -> jax.Array:
    """The leaf's scores; entries pruned by ``old_mask`` score 0."""
    score = self.fn(param, update, key)
    if self.zero_when_pruned:
      return score
    return jnp.where(old_mask, score, jnp.zeros((), score.dtype))

  def check(self, path: str, leaf) -> None:
    """Traces the function abstractly on ``leaf``; a clear error if it misbehaves.

    Leaves of one shape and dtype are traced once (a deep model has many).
    """
    spec = jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf))
    out = _checks.cached(_traced_score, self.fn, spec)
    if isinstance(out, Exception):  # Any failure here is the score's, not ours.
      raise ValueError(f"`score` failed on leaf {path}: {out}") from out
    if (
        not hasattr(out, "shape")
        or out.shape != spec.shape
        or not jnp.issubdtype(out.dtype, jnp.floating)
    ):
      raise ValueError(
          f"`score` must return a floating array of the leaf's shape; for leaf"
          f" {path} of shape {spec.shape} it returned {out}."
      )


@functools.lru_cache(maxsize=4096)
def _traced_score(fn: ScoreFn, spec: jax.ShapeDtypeStruct) -> Any:
  """What ``fn`` returns on ``spec`` abstractly, or the exception it raised."""
  key = jax.eval_shape(lambda: jax.random.key(0))
  try:
    return jax.eval_shape(fn, spec, spec, key)
  except Exception as e:
    return e


_BUILTIN = {
    "magnitude": Score(magnitude, zero_when_pruned=True),
    "saliency": Score(saliency),
    "random": Score(random),
}


def resolve(score: Any) -> Score:
  """The :class:`Score` that ``score`` (a name or a callable) means."""
  if isinstance(score, str) and score in _BUILTIN:
    return _BUILTIN[score]
  if callable(score):
    return Score(score)
  raise ValueError(
      f"`score` must be one of {SCORES} or a callable"
      f" `score(param, update, key) -> array`; got {score!r}."
  )


def step_key(seed: int, count: jax.Array) -> jax.Array:
  """The key of a mask update: ``seed`` folded with the step count."""
  return jax.random.fold_in(jax.random.key(seed), count)


def leaf_key(key: jax.Array, index: int) -> jax.Array:
  """A leaf's key: the step's key folded with the leaf's flat index."""
  return jax.random.fold_in(key, index)
