"""Where leaves live on devices, and the only places where that matters.

Masks are computed without gathering a parameter wherever a method allows it
(the radix search counts on each shard; only scalars cross devices). Three
things need to know about placement, and all of them are here:

* :func:`known_whole`: whether a leaf is known not to be split over devices
  (the ``"auto"`` threshold sorts only such leaves);
* :func:`gathered` / :func:`put_back`: under Explicit mesh axes a step that
  needs a leaf whole (a sort, the reshapes of structured units) reshards it
  explicitly and puts its mask back where the leaf lives; under Auto axes XLA
  decides, and nothing is done here;
* :func:`ones_like`: masks at ``init`` take their param's placement;
* :func:`replicated` / :func:`like_axis`: small count vectors, whole on every
  device, or split like a stack's layer axis for the ``vmap`` over its layers;
* :func:`placed_like`: stored masks placed like their params.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def known_whole(leaf: Any) -> bool:
  """Whether ``leaf`` is known not to be split over devices.

  Concrete arrays and Explicit mesh axes (in the type) tell; inside ``jit``
  under Auto mesh axes XLA places a leaf only later, so that is unknown.
  """
  if jax.device_count() == 1 or not isinstance(leaf, jax.Array):
    return True  # One device, or a host value (NumPy, Python number).
  if not isinstance(leaf, jax.core.Tracer):
    return leaf.sharding.is_fully_replicated
  sharding = jax.typeof(leaf).sharding
  mesh = sharding.mesh
  explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  return not mesh.empty and explicit and all(s is None for s in sharding.spec)


def explicit_sharding(x: jax.Array) -> Optional[Any]:
  """The sharding of ``x`` if Explicit mesh axes split it, else None."""
  sharding = jax.typeof(x).sharding
  return sharding if any(s is not None for s in sharding.spec) else None


def gathered(x: jax.Array) -> tuple[jax.Array, Optional[Any]]:
  """``x`` whole on every device, and the sharding to :func:`put_back` into.

  Only Explicit mesh axes are resharded (the type says so); otherwise ``x``
  is returned as it is with None.
  """
  sharding = explicit_sharding(x)
  return (jax.sharding.reshard(x, P()), sharding) if sharding else (x, None)


def replicated(x: jax.Array) -> jax.Array:
  """``x`` (a few counts) whole on every device where Explicit mesh axes
  split it; as it is otherwise."""
  return jax.sharding.reshard(x, P()) if explicit_sharding(x) else x


def like_axis(x: jax.Array, of: jax.Array, axis: int = 0) -> jax.Array:
  """The vector ``x`` split like ``of``'s ``axis`` where Explicit mesh axes
  split that axis (``vmap`` over it needs its inputs split alike)."""
  sharding = explicit_sharding(of)
  spec = sharding.spec[axis] if sharding and axis < len(sharding.spec) else None
  return jax.sharding.reshard(x, P(spec)) if spec is not None else x


def placed_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` resharded like ``like`` where Explicit mesh axes place them
  differently (a state placed by other rules than its params:
  ``nnx.Optimizer`` places it by the Variables' metadata); as it is otherwise."""
  want = jax.typeof(like).sharding
  if (explicit_sharding(x) or explicit_sharding(like)) and jax.typeof(x).sharding != want:
    return jax.sharding.reshard(x, want)
  return x


def put_back(x: jax.Array, sharding: Optional[Any]) -> jax.Array:
  """``x`` resharded to ``sharding`` from :func:`gathered` (None: as it is)."""
  return jax.sharding.reshard(x, sharding) if sharding else x


def ones_like(param: jax.Array) -> jax.Array:
  """An all-True mask placed like ``param``, sharded ones included."""
  return jnp.ones_like(param, dtype=jnp.bool_)
