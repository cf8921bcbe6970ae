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


# Structured granularities: unit scores in float64 from loops, then the same
# unit ranking as entries (`keep_masks` on the unit scores).
def n_of_m_masks(x, sparsity, n, m, axis):
  """Groups of m along `axis`; round(s*G) cheapest groups keep their n largest."""
  x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  groups = x.reshape(-1, m)
  keys = [magnitude_keys(g.astype(np.float32)) for g in groups]
  # Within a group: the m-n smallest keys (stable: lower position first) go.
  lose = [np.argsort(k, kind="stable")[: m - n] for k in keys]
  cost = np.array([np.abs(g[i]).sum() for g, i in zip(groups, lose)], np.float32)
  chosen = ~keep_masks([cost], sparsity)[0]
  keep = np.ones(groups.shape, bool)
  for g, (i, c) in enumerate(zip(lose, chosen)):
    if c:
      keep[g, i] = False
  return np.moveaxis(keep.reshape(x.shape), -1, axis)


def block_masks(x, sparsity, bh, bw, reduce):
  """(bh, bw) blocks of the last two axes, edge blocks over their real entries."""
  x = np.abs(np.asarray(x, np.float64))
  h, w = x.shape[-2:]
  lead = x.reshape((-1, h, w))
  hb, wb = -(-h // bh), -(-w // bw)
  scores = np.zeros((lead.shape[0], hb, wb))
  for b in range(lead.shape[0]):
    for i in range(hb):
      for j in range(wb):
        block = lead[b, i * bh:(i + 1) * bh, j * bw:(j + 1) * bw]
        scores[b, i, j] = block.max() if reduce == "max" else block.mean()
  unit_keep = keep_masks([scores.astype(np.float32)], sparsity)[0]
  keep = np.repeat(np.repeat(unit_keep, bh, axis=1), bw, axis=2)[:, :h, :w]
  return keep.reshape(x.shape)


def channel_masks(x, sparsity, axis, norm):
  x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
  flat = x.reshape(x.shape[0], -1)
  order = 1 if norm == "l1" else 2
  scores = np.linalg.norm(flat, ord=order, axis=1) if flat.shape[1] else np.zeros(len(flat))
  unit_keep = keep_masks([scores.astype(np.float32)], sparsity)[0]
  keep = np.broadcast_to(unit_keep.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
  return np.moveaxis(keep, 0, axis)


def erk_densities(shapes, sparsity):
  """ERK densities in float64: cap the largest ratio at 1 until the rest fit."""
  sizes = np.array([np.prod(s) for s in shapes], np.float64)
  ratios = np.array([sum(s) / np.prod(s) for s in shapes], np.float64)
  dense = np.zeros(len(shapes), bool)
  while True:
    keep = (1 - sparsity) * sizes.sum() - sizes[dense].sum()
    rest = (ratios * sizes)[~dense].sum()
    epsilon = keep / rest if rest else 0.0
    density = np.where(dense, 1.0, epsilon * ratios)
    if not (density > 1).any():
      return density
    dense |= density > 1


def drop_and_grow(old, w, grow, fraction, regrow_dropped=True):
  """RigL's and SET's update of one leaf's keep-mask ``old``: drop the
  round(f * k) kept entries of smallest |w|, then grow as many candidates of
  largest |grow|: every entry not kept after the drop, or with
  ``regrow_dropped=False`` only those pruned before (then d <= n - k). Ties:
  lower flat index pruned first. Returns the flat mask and the dropped indices."""
  old = np.asarray(old, bool).reshape(-1)
  n, k = old.size, int(old.sum())
  fraction = min(max(float(np.nan_to_num(np.float32(fraction))), 0.0), 1.0)
  d = int(np.round(np.float32(fraction) * np.float32(k)))
  if not regrow_dropped:
    d = min(d, n - k)
  kept = np.flatnonzero(old)
  dropped = kept[np.argsort(magnitude_keys(w)[kept], kind="stable")[:d]]
  after = old.copy()
  after[dropped] = False
  candidates = np.flatnonzero(~after if regrow_dropped else ~old)
  order = candidates[np.argsort(magnitude_keys(grow)[candidates], kind="stable")]
  new = after.copy()
  new[order[len(order) - d:]] = True
  return new, dropped


def sparsegpt(w, h, sparsity, blocksize, compare="block", nm=None, dampening=0.01):
  """SparseGPT on ``w`` (in, out) with Hessian ``h`` (in, in), in float64 loops.

  As Frantar & Alistarh's reference code (transposed: rows are inputs), with
  exact counts: round(s * n) of each block's n entries (``"block"``), of each
  column (``"output"``) or of the leaf (``"leaf"``), by w^2 / U_jj^2 with
  U the upper Cholesky factor of H^-1, stable (lower row-major position
  first); ``nm=(n, m)``: at every m-th row the m - n smallest of each
  column's group go. Returns ``(new w, keep-mask)``.
  """
  w = np.array(w, np.float64)
  h = np.array(h, np.float64)
  k, o = w.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead, :] = 0.0
  h += dampening * np.mean(np.diag(h)) * np.eye(k)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  d = np.diag(u)

  def smallest(scores, count):
    out = np.zeros(scores.size, bool)
    out[np.argsort(scores.reshape(-1), kind="stable")[:count]] = True
    return out.reshape(scores.shape)

  pruned = np.zeros((k, o), bool)
  scores = w ** 2 / d[:, None] ** 2
  if compare == "leaf":
    pruned = smallest(scores, prune_count(sparsity, k * o))
  elif compare == "output":
    for j in range(o):
      pruned[:, j] = smallest(scores[:, j], prune_count(sparsity, k))
  for i1 in range(0, k, blocksize):
    i2 = min(i1 + blocksize, k)
    w1 = w[i1:i2].copy()
    err1 = np.zeros_like(w1)
    if compare == "block" and nm is None:
      pruned[i1:i2] = smallest(w1 ** 2 / d[i1:i2, None] ** 2, prune_count(sparsity, w1.size))
    for i in range(i2 - i1):
      if nm is not None and i % nm[1] == 0:
        n, m = nm
        for j in range(o):
          group = w1[i:i + m, j] ** 2 / d[i1 + i:i1 + i + m] ** 2
          pruned[i1 + i:i1 + i + m, j] = smallest(group, m - n)
      q = np.where(pruned[i1 + i], 0.0, w1[i])
      err = (w1[i] - q) / u[i1 + i, i1 + i]
      w1[i:] -= np.outer(u[i1 + i, i1 + i:i2], err)
      w1[i] = q
      err1[i] = err
    w[i1:i2] = w1
    w[i2:] -= u[i1:i2, i2:].T @ err1
  return w, ~pruned
