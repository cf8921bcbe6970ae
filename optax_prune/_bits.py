"""How keep-masks are stored: bool, or packed bits (8 entries per uint8).

Packing along the last axis keeps an array's rank and its other axes, so a
packed mask takes its param's ``PartitionSpec`` unchanged: a shard of the
last axis whose length is a multiple of 8 packs into whole bytes of the same
shard. Bits are big-endian within a byte, as ``np.packbits``; the last byte of
a row is padded with zeros.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of :func:`pack` of a bool array of ``shape``.

  A 0-d array packs as a vector of one entry.
  """
  if not shape:
    return (1,)
  return (*shape[:-1], -(-shape[-1] // 8))


def pack(mask: jax.Array) -> jax.Array:
  """``mask`` (bool, any shape) as uint8 bits along its last axis."""
  mask = jnp.asarray(mask)
  if mask.ndim == 0:
    mask = mask.reshape(1)
  return jnp.packbits(mask, axis=-1)


def unpack(bits: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The bool mask of ``shape`` that :func:`pack` turned into ``bits``.

  ``bits`` may have been cast to a float type (a whole-state cast): every
  byte value (0..255) is exact in bf16, f16 and wider, so it is read back as
  uint8 first.
  """
  bits = jnp.asarray(bits)
  if 0 in shape:
    return jnp.zeros(shape, bool)
  if bits.dtype != jnp.uint8:
    bits = bits.astype(jnp.uint8)
  length = shape[-1] if shape else 1
  return jnp.unpackbits(bits, axis=-1, count=length).astype(bool).reshape(shape)


def pack_np(mask: np.ndarray) -> np.ndarray:
  """:func:`pack` on the host (NumPy)."""
  mask = np.asarray(mask, bool)
  return np.packbits(mask.reshape(mask.shape or (1,)), axis=-1)


def unpack_np(bits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """:func:`unpack` on the host (NumPy)."""
  if 0 in shape:
    return np.zeros(shape, bool)
  length = shape[-1] if shape else 1
  return np.unpackbits(np.asarray(bits, np.uint8), axis=-1, count=length).astype(bool).reshape(shape)


def kept_count(stored: jax.Array) -> jax.Array:
  """Kept entries (int32) of a mask stored bool or packed, jittable.

  Packing pads with zero bits, so counting set bits counts kept entries.
  """
  stored = jnp.asarray(stored)
  if stored.dtype == jnp.bool_:
    return jnp.sum(stored, dtype=jnp.int32)
  bits = jax.lax.population_count(stored.astype(jnp.uint8))
  return jnp.sum(bits, dtype=jnp.int32)


def is_packed_for(mask, shape: tuple[int, ...]) -> bool:
  """Whether ``mask`` holds a leaf of ``shape``'s mask as packed bits.

  Packed masks are uint8 (or a float cast of them) of :func:`packed_shape`;
  bool masks are bool (or a float cast) of ``shape``. Where the two shapes
  coincide (a last axis of length 1) both readings (``!= 0`` and the top
  bit) agree.
  """
  return tuple(np.shape(mask)) == packed_shape(shape) and (
      tuple(np.shape(mask)) != tuple(shape) or np.dtype(mask.dtype) == np.uint8)


@dataclasses.dataclass(frozen=True)
class MaskLayout:
  """How keep-masks are stored in the pruning state.

  ``packed=False``: one bool per entry, shaped like the param. ``packed=True``:
  uint8 bits along the last axis (:func:`pack`), 8x smaller, unpacked inside
  the jitted step where a mask is read.
  """

  packed: bool = False

  def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return packed_shape(shape) if self.packed else tuple(shape)

  def store(self, mask: jax.Array) -> jax.Array:
    """A bool mask as stored."""
    return pack(mask) if self.packed else mask

  def normalized(self, stored: jax.Array) -> jax.Array:
    """A stored mask in its own dtype again, after a float cast of the state
    (``tree_map_params``): ``!= 0`` for bool masks, uint8 for packed ones."""
    if self.packed:
      return stored if stored.dtype == jnp.uint8 else stored.astype(jnp.uint8)
    return stored if stored.dtype == jnp.bool_ else stored != 0

  def read(self, stored: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The bool keep-mask of a leaf of ``shape``."""
    return unpack(stored, shape) if self.packed else self.normalized(stored)
