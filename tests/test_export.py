"""Sparse exports (BCOO, N:M) and their size report, against NumPy references."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import sparse

import optax_prune
from optax_prune import _export


def _bits(x) -> np.ndarray:
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def _assert_bitwise_equal(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.dtype == expected.dtype and actual.shape == expected.shape
  np.testing.assert_array_equal(_bits(actual), _bits(expected))


def _nm_mask(rng, shape, n, m, axis, p=0.7):
  """A random mask keeping at most n of every m entries along `axis`.

  Random entries are switched on, then only the first n of them in each group
  stay on, so some groups keep n and some fewer.
  """
  mask = np.moveaxis(rng.random(shape) < p, axis, -1)
  grouped = mask.reshape(mask.shape[:-1] + (mask.shape[-1] // m, m))
  grouped = grouped & (np.cumsum(grouped, axis=-1) <= n)
  return np.moveaxis(grouped.reshape(mask.shape), -1, axis)


def _nm_reference(x, mask, n, m, axis):
  """Values and kept indices of each group, by a plain loop over groups."""
  x, mask = np.moveaxis(x, axis, -1), np.moveaxis(mask, axis, -1)
  values = np.zeros(x.shape[:-1] + (x.shape[-1] // m * n,), x.dtype)
  kept_indices = {}
  for idx in np.ndindex(*x.shape[:-1]):
    for g in range(x.shape[-1] // m):
      positions = [j for j in range(m) if mask[idx + (g * m + j,)]]
      for k, j in enumerate(positions):
        values[idx + (g * n + k,)] = x[idx + (g * m + j,)]
      kept_indices[idx + (g,)] = positions
  return np.moveaxis(values, -1, axis), kept_indices


def _params_and_masks(rng):
  w = rng.normal(size=(5, 7)).astype(np.float32)
  w_mask = rng.random((5, 7)) < 0.4
  w[0, 0], w_mask[0, 0] = 0.0, True  # Kept, and zero by chance.
  conv = rng.normal(size=(2, 3, 4)).astype(np.float32)
  conv_mask = rng.random((2, 3, 4)) < 0.5
  params = {"w": jnp.asarray(w), "conv": jnp.asarray(conv), "b": jnp.ones(7)}
  masks = {"w": jnp.asarray(w_mask), "conv": jnp.asarray(conv_mask),
           "b": optax.MaskedNode()}
  return params, masks


# to_bcoo.


def test_to_bcoo_stores_exactly_the_kept_entries():
  rng = np.random.default_rng(0)
  params, masks = _params_and_masks(rng)
  out = _export.to_bcoo(params, masks)
  assert out["b"] is params["b"]
  for name in ("w", "conv"):
    x, mask = np.asarray(params[name]), np.asarray(masks[name])
    assert isinstance(out[name], sparse.BCOO)
    assert out[name].nse == mask.sum() and out[name].dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(out[name].todense()),
                                  np.where(mask, x, 0))
  # The kept zero is stored: the mask, not the value, decides.
  stored = {tuple(i) for i in np.asarray(out["w"].indices)}
  assert (0, 0) in stored and len(stored) == out["w"].nse
  v = rng.normal(size=7).astype(np.float32)
  expected = np.where(masks["w"], params["w"], 0).astype(np.float64) @ v
  np.testing.assert_allclose(np.asarray(out["w"] @ jnp.asarray(v)), expected,
                             rtol=1e-6, atol=1e-6)


def test_to_bcoo_without_masks_converts_float_matrices_by_nonzeros():
  x = np.array([[0.0, 1.5, 0.0], [-2.0, 0.0, 3.0]], np.float32)
  params = {"w": jnp.asarray(x), "b": jnp.array([0.0, 1.0]),
            "i": jnp.array([[0, 1], [2, 0]])}
  out = _export.to_bcoo(params)
  assert out["b"] is params["b"] and out["i"] is params["i"]
  assert out["w"].nse == 3
  np.testing.assert_array_equal(np.asarray(out["w"].todense()), x)


def test_to_bcoo_keeps_bfloat16_and_handles_empty_and_scalar_leaves():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.bfloat16)
  mask = jnp.asarray(np.random.default_rng(2).random((4, 6)) < 0.5)
  params = {"x": x, "empty": jnp.zeros((0, 3)), "s": jnp.float32(2.0)}
  masks = {"x": mask, "empty": jnp.zeros((0, 3), bool), "s": jnp.array(True)}
  out = _export.to_bcoo(params, masks)
  assert out["x"].dtype == jnp.bfloat16 and out["x"].data.dtype == jnp.bfloat16
  _assert_bitwise_equal(out["x"].todense(), jnp.where(mask, x, 0))
  assert out["empty"].nse == 0 and out["empty"].todense().shape == (0, 3)
  assert out["s"].nse == 1 and float(out["s"].todense()) == 2.0


def test_to_bcoo_pairs_nnx_params_with_pure_masks():
  from flax import nnx
  params = nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Param)
  kernel = np.asarray(params["kernel"][...])
  mask = np.abs(kernel) > np.median(np.abs(kernel))
  out = _export.to_bcoo(params, {"kernel": jnp.asarray(mask),
                                 "bias": optax.MaskedNode()})
  bcoo = out["kernel"][...]
  assert isinstance(bcoo, sparse.BCOO) and bcoo.nse == mask.sum()
  np.testing.assert_array_equal(np.asarray(bcoo.todense()),
                                np.where(mask, kernel, 0))


def test_to_bcoo_rejects_bad_masks_and_tracing():
  params = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="`masks`"):
    _export.to_bcoo(params, {"w": jnp.ones((3, 2), bool)})
  with pytest.raises(ValueError, match="`masks`"):
    _export.to_bcoo(params, {"w": jnp.ones((2, 3))})
  with pytest.raises(ValueError, match="`masks`"):
    _export.to_bcoo(params, {"v": jnp.ones((2, 3), bool)})
  with pytest.raises(ValueError, match="outside `jax.jit`"):
    jax.jit(_export.to_bcoo)(params, {"w": jnp.ones((2, 3), bool)})


# to_nm.


@st.composite
def _nm_cases(draw):
  m = draw(st.integers(2, 8))
  n = draw(st.integers(1, m - 1))
  ndim = draw(st.integers(1, 3))
  axis = draw(st.integers(-ndim, ndim - 1))
  shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
  shape[axis] = m * draw(st.integers(0, 3))
  dtype = draw(st.sampled_from([np.float32, jnp.bfloat16]))
  seed = draw(st.integers(0, 2**32 - 1))
  return tuple(shape), n, m, axis, dtype, seed


@settings(max_examples=25)
@given(_nm_cases())
def test_to_nm_round_trips_bitwise(case):
  shape, n, m, axis, dtype, seed = case
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(dtype)
  specials = np.array([0.0, -0.0, np.nan, np.inf], dtype)
  x = np.where(rng.random(shape) < 0.2, rng.choice(specials, shape), x).astype(dtype)
  mask = _nm_mask(rng, shape, n, m, axis)
  w = _export.to_nm(jnp.asarray(x), jnp.asarray(mask), optax_prune.n_of_m(n, m, axis=axis))
  dense = w.todense()
  _assert_bitwise_equal(dense, np.where(mask, x, np.zeros((), dtype)))
  _assert_bitwise_equal(dense, jnp.where(mask, x, 0))
  ref_values, kept_indices = _nm_reference(x, mask, n, m, axis)
  _assert_bitwise_equal(w.values, ref_values)
  assert w.indices.dtype == jnp.uint8 and w.indices.shape == ref_values.shape
  assert (w.n, w.m, w.axis, w.shape) == (n, m, axis % len(shape), shape)
  indices = np.moveaxis(np.asarray(w.indices), axis, -1)
  values = np.moveaxis(np.asarray(w.values), axis, -1)
  for idx, positions in kept_indices.items():
    slots = indices[idx[:-1]][idx[-1] * n:(idx[-1] + 1) * n]
    pad_values = values[idx[:-1]][idx[-1] * n + len(positions):(idx[-1] + 1) * n]
    assert list(slots[:len(positions)]) == positions
    # Padding: distinct positions the group does not keep, holding +0.
    assert len(set(slots)) == n and not set(slots[len(positions):]) & set(positions)
    assert np.all(_bits(pad_values) == 0)
  # Without a mask, the nonzeros are kept.
  x_kept = np.where(mask, np.where(np.isnan(x) | (x != 0), x, 1), 0).astype(dtype)
  _assert_bitwise_equal(_export.to_nm(x_kept, None, optax_prune.n_of_m(n, m, axis=axis)).todense(), x_kept)


@pytest.mark.parametrize("axis", [0, -1])
def test_two_four_on_a_matrix(axis):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(8, 12)).astype(np.float32)
  # Magnitude 2:4: the two largest of each group of 4 along `axis`.
  moved = np.moveaxis(x, axis, -1)
  groups = np.abs(moved).reshape(moved.shape[0], -1, 4)
  ranks = np.argsort(np.argsort(-groups, axis=-1), axis=-1)
  mask = np.moveaxis((ranks < 2).reshape(moved.shape), -1, axis)
  w = _export.to_nm(x, jnp.asarray(mask), optax_prune.n_of_m(2, 4, axis=axis))
  assert w.values.shape == ((4, 12) if axis == 0 else (8, 6))
  assert w.axis == (0 if axis == 0 else 1) and w.shape == (8, 12)
  _assert_bitwise_equal(w.todense(), np.where(mask, x, np.float32(0)))
  _assert_bitwise_equal(w.values, _nm_reference(x, mask, 2, 4, axis)[0])


def test_to_nm_errors_name_the_argument():
  x = np.ones((8, 12), np.float32)
  mask = np.zeros((8, 12), bool)
  mask[3, 4:7] = True  # One group keeps 3 of 4.
  with pytest.raises(ValueError, match=r"`mask`.* 1 of 24 groups .*keeps 3"):
    _export.to_nm(x, mask, optax_prune.n_of_m(2, 4, axis=-1))
  with pytest.raises(ValueError, match=r"`mask`.* 24 of 24 groups .*keeps 4"):
    _export.to_nm(x, None, optax_prune.n_of_m(2, 4, axis=-1))
  with pytest.raises(ValueError, match=r"`axis`.*length 12.*`m`=8"):
    _export.to_nm(x, None, optax_prune.n_of_m(2, 8, axis=1))
  with pytest.raises(ValueError, match="`axis`"):
    _export.to_nm(x, None, optax_prune.n_of_m(2, 4, axis=2))
  with pytest.raises(ValueError, match="`axis`"):
    _export.to_nm(np.float32(1.0), None, optax_prune.n_of_m(2, 4, axis=-1))
  for bad in [(2, 4, -1), "2:4", None, optax_prune.blocks((2, 4))]:
    with pytest.raises(ValueError, match="`nm` must be an N:M granularity"):
      _export.to_nm(x, None, bad)
  with pytest.raises(ValueError, match="`mask`"):
    _export.to_nm(x, np.ones((8, 12)), optax_prune.n_of_m(2, 4, axis=-1))


# nm_matmul.


def _subjaxprs(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _subjaxprs(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _subjaxprs(sub)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (3, 8)])
def test_nm_matmul_matches_masked_dense_under_jit(n, m):
  rng = np.random.default_rng(n * 10 + m)
  k, cols = 8, 12
  kernel = rng.normal(size=(k, cols)).astype(np.float32)
  mask = _nm_mask(rng, (k, cols), n, m, axis=0)
  w = _export.to_nm(kernel, jnp.asarray(mask), optax_prune.n_of_m(n, m, axis=0))
  traces = []

  @jax.jit
  def apply(inputs, w):
    traces.append(1)
    return _export.nm_matmul(inputs, w)

  for _ in range(2):
    inputs = rng.normal(size=(3, k)).astype(np.float32)
    expected = inputs.astype(np.float64) @ np.where(mask, kernel, 0).astype(np.float64)
    np.testing.assert_allclose(np.asarray(apply(inputs, w)), expected, rtol=1e-5, atol=1e-6)
  assert len(traces) == 1
  # No intermediate has the dense weight's shape, and nothing is scattered.
  eqns = list(_subjaxprs(jax.make_jaxpr(_export.nm_matmul)(inputs, w).jaxpr))
  assert eqns and all(v.aval.shape != (k, cols) for e in eqns for v in e.outvars)
  assert not any("scatter" in e.primitive.name for e in eqns)
  # Leading batch dimensions, and a single vector.
  batched = rng.normal(size=(2, 3, k)).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(_export.nm_matmul(batched, w)),
      batched.astype(np.float64) @ np.where(mask, kernel, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(_export.nm_matmul(batched[0, 0], w)),
      batched[0, 0].astype(np.float64) @ np.where(mask, kernel, 0), rtol=1e-5, atol=1e-6)


def test_nm_matmul_rejects_other_layouts():
  x = np.ones((8, 12), np.float32)
  with pytest.raises(ValueError, match="`w`"):
    _export.nm_matmul(jnp.ones((3, 8)), _export.to_nm(x, np.zeros((8, 12), bool), optax_prune.n_of_m(axis=1)))
  with pytest.raises(ValueError, match="`w`"):
    _export.nm_matmul(jnp.ones((3, 2)), _export.to_nm(np.zeros((4, 8, 12)), None, optax_prune.n_of_m(axis=0)))
  with pytest.raises(ValueError, match="`inputs`"):
    _export.nm_matmul(jnp.ones((3, 7)), _export.to_nm(np.zeros((8, 12)), None, optax_prune.n_of_m(axis=0)))


# export_size_report.


def test_size_report_counts_bytes_by_hand_and_as_exported():
  rng = np.random.default_rng(4)
  w = rng.normal(size=(8, 12)).astype(np.float32)
  w_mask = _nm_mask(rng, (8, 12), 2, 4, axis=-1)
  conv = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.bfloat16)
  conv_mask = np.zeros((2, 3, 4), bool)
  conv_mask[0, 0, :3] = True  # 3 of 4: not 2:4.
  params = {"w": jnp.asarray(w), "conv": conv, "b": jnp.ones(12),
            "empty": jnp.zeros((0, 4))}
  masks = {"w": jnp.asarray(w_mask), "conv": jnp.asarray(conv_mask),
           "b": optax.MaskedNode(), "empty": jnp.zeros((0, 4), bool)}
  report = _export.export_size_report(params, masks, nm=optax_prune.n_of_m(2, 4, axis=-1))
  rows = {r.path: r for r in report.rows}
  assert set(rows) == {"['w']", "['conv']", "['b']", "['empty']"}
  exported = _export.to_bcoo(params, masks)
  for name, mask in [("w", w_mask), ("conv", conv_mask), ("empty", masks["empty"])]:
    row, leaf = rows[f"['{name}']"], params[name]
    itemsize = jnp.dtype(leaf.dtype).itemsize
    kept = int(np.sum(mask))
    assert row.shape == leaf.shape and row.dtype == str(jnp.dtype(leaf.dtype))
    assert row.dense_bytes == leaf.size * itemsize == leaf.nbytes
    assert row.kept == kept
    assert row.bcoo_bytes == kept * itemsize + kept * leaf.ndim * 4
    assert row.bcoo_bytes == exported[name].data.nbytes + exported[name].indices.nbytes
  packed = _export.to_nm(w, w_mask, optax_prune.n_of_m(2, 4, axis=-1))
  assert rows["['w']"].nm_bytes == packed.values.nbytes + packed.indices.nbytes == 48 * 5
  assert rows["['empty']"].nm_bytes == 0
  assert rows["['conv']"].nm_bytes is None  # The pattern does not hold.
  b = rows["['b']"]
  assert (b.kept, b.bcoo_bytes, b.nm_bytes) == (12, b.dense_bytes, None)
  assert report.dense_bytes == 8 * 12 * 4 + 24 * 2 + 12 * 4
  assert report.bcoo_bytes == (rows["['w']"].bcoo_bytes + rows["['conv']"].bcoo_bytes
                               + 12 * 4)
  assert report.nm_bytes == 48 * 5 + 24 * 2 + 12 * 4  # conv and b dense.
  text = str(report)
  assert all(path in text for path in rows) and "total" in text
  assert text.splitlines()[0].split() == ["path", "shape", "kept", "dense", "B",
                                          "BCOO", "B", "N:M", "B", "ratio"]
  lines = text.splitlines()
  assert len({len(line) for line in lines}) == 1  # Aligned.
  assert str(report.dense_bytes) in lines[-1] and str(report.nm_bytes) in lines[-1]


def test_size_report_without_nm_or_masks():
  x = np.array([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0]], np.float32)
  params = {"w": jnp.asarray(x), "b": jnp.ones(4)}
  report = _export.export_size_report(params)
  rows = {r.path: r for r in report.rows}
  assert rows["['w']"].kept == 3 and rows["['w']"].bcoo_bytes == 3 * (4 + 2 * 4)
  assert rows["['b']"].bcoo_bytes == 16 and rows["['b']"].kept == 4
  assert report.nm_bytes is None and all(r.nm_bytes is None for r in report.rows)
  assert report.bcoo_bytes == 36 + 16 and report.dense_bytes == 32 + 16
  text = str(report)
  assert "['w']" in text and "['b']" in text
  # 2:4 holds for w along axis 1 but not along axis 0 (length 2).
  assert _export.export_size_report(params, nm=optax_prune.n_of_m(2, 4, axis=1)).rows[1].nm_bytes == 4 * 5
  assert _export.export_size_report(params, nm=optax_prune.n_of_m(2, 4, axis=0)).rows[1].nm_bytes is None
  assert _export.export_size_report(params, nm=optax_prune.n_of_m(1, 4, axis=1)).rows[1].nm_bytes is None
  for bad in [(2, 4, 0), (2, 4), "2:4", optax_prune.channels()]:
    with pytest.raises(ValueError, match="`nm` must be an N:M granularity"):
      _export.export_size_report(params, nm=bad)
