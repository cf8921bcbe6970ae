"""NumPy reference for masks and schedules, written independently of the library."""

import math
from fractions import Fraction

import numpy as np


def magnitude_keys(x, wide=False) -> np.ndarray:
  """Ranking keys: |x| bits (NaN above inf), flattened; float64 bits if wide."""
  float_type, key_type = (np.float64, np.uint64) if wide else (np.float32, np.uint32)
  x = np.asarray(x).astype(float_type).reshape(-1)
  return x.view(key_type) & ~(key_type(1) << key_type(8 * x.itemsize - 1))


def prune_count(sparsity, n: int) -> int:
  """round(s * n), half to even, with s the float32 value, exactly."""
  return round(Fraction(float(np.float32(sparsity))) * n)


def keep_masks(leaves, sparsity):
  """Prunes the round(s*n) smallest keys of the group; ties by (leaf, index).

  A group with a float64 leaf is ranked by float64 values, others by float32.
  """
  wide = any(np.asarray(x).dtype == np.float64 for x in leaves)
  keys = np.concatenate([magnitude_keys(x, wide) for x in leaves] or [np.zeros(0, np.uint32)])
  k = prune_count(sparsity, keys.size)
  order = np.argsort(keys, kind="stable")  # Stable: lower position first.
  keep = np.ones(keys.size, bool)
  keep[order[:k]] = False
  masks, offset = [], 0
  for x in leaves:
    size = int(np.size(x))
    masks.append(keep[offset:offset + size].reshape(np.shape(x)))
    offset += size
  return masks


def log_sparsity(epoch, upper, interval, end):
  """The dynamic hook's formula, at the last update epoch <= `epoch`."""
  updates = [e for e in range(0, end + 1) if e % interval == 0] + [end]
  last = max(e for e in updates if e <= epoch)
  return upper * math.log(2 + last / interval) / math.log(2 + end / interval)


def polynomial_sparsity(step, final, begin, end, frequency, initial, power):
  if step < begin:
    return 0.0
  updates = list(range(begin, end + 1, frequency)) + [end]
  last = max(t for t in updates if t <= step)
  if end == begin:
    return final
  return final + (initial - final) * (1 - (last - begin) / (end - begin)) ** power
