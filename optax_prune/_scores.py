"""What ranks the weights: magnitude, saliency, random, or a score of your own.

A score maps one leaf to an array of its shape; entries (or units, see
``_granularity``) with the smallest ``|score|`` are pruned first. The
signature is ``score(param, update, key) -> array``: ``update`` is what the
pruning transformation receives (the last link of the chain: with plain SGD
that is ``-lr * grad``, with Adam Adam's step), ``key`` a PRNG key derived
from ``seed``, the step count and the leaf's position, so a resumed run draws
the same numbers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

SCORES = ("magnitude", "saliency", "random")
ScoreFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def magnitude(param, update, key):
  """``|w|``: the classic criterion."""
  del update, key
  return param


def saliency(param, update, key):
  """``|w * u|``: first-order estimate of the loss change from removing ``w``."""
  del key
  dtype = jnp.promote_types(param.dtype, jnp.float32)
  return param.astype(dtype) * update.astype(dtype)


def random(param, update, key):
  """Uniform random scores: a random mask of the exact size (a baseline)."""
  del update
  return jax.random.uniform(key, param.shape, jnp.float32)


_BUILTIN = {"magnitude": magnitude, "saliency": saliency, "random": random}


def resolve(score: Any) -> ScoreFn:
  """The score function that ``score`` (a name or a callable) means."""
  if callable(score):
    return score
  if score in _BUILTIN:
    return _BUILTIN[score]
  raise ValueError(
      f"`score` must be one of {SCORES} or a callable"
      f" `score(param, update, key) -> array`; got {score!r}."
  )


def check(score_fn: ScoreFn, path: str, leaf) -> None:
  """Traces ``score_fn`` abstractly on ``leaf``; a clear error if it misbehaves."""
  spec = jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf))
  key = jax.eval_shape(lambda: jax.random.key(0))
  try:
    out = jax.eval_shape(score_fn, spec, spec, key)
  except Exception as e:  # Any failure here is the score's, not ours.
    raise ValueError(f"`score` failed on leaf {path}: {e}") from e
  if (
      not hasattr(out, "shape")
      or out.shape != spec.shape
      or not jnp.issubdtype(out.dtype, jnp.floating)
  ):
    raise ValueError(
        f"`score` must return a floating array of the leaf's shape; for leaf"
        f" {path} of shape {spec.shape} it returned {out}."
    )
