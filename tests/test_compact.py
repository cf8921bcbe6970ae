"""Compact pruned params (kept values + mask bits), in memory and with orbax, against NumPy."""

import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import optax_prune
from optax_prune import _bits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bits_of(x) -> np.ndarray:
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def _assert_bitwise_equal(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.dtype == expected.dtype and actual.shape == expected.shape
  np.testing.assert_array_equal(_bits_of(actual), _bits_of(expected))


def _masked(x, mask) -> np.ndarray:
  """The reference: pruned entries +0.0, kept ones as they are, bit for bit."""
  x = np.asarray(x)
  return np.where(mask, x, np.zeros((), x.dtype))


def _x64():
  enable = getattr(jax, "enable_x64", None)
  if enable is None:
    from jax.experimental import enable_x64 as enable  # pylint: disable=import-outside-toplevel
  return enable(True)


def _leaf(rng, shape, dtype, p=0.4):
  """Random weights with a kept zero, a kept -0.0 and a kept NaN when room."""
  x = rng.standard_normal(shape).astype(dtype)
  mask = rng.random(shape) < p
  flat_x, flat_m = x.reshape(-1), mask.reshape(-1)
  for i, v in enumerate([0.0, -0.0, np.nan][:flat_x.size]):
    flat_x[i], flat_m[i] = v, True
  return x, mask


def _round_trip(params, masks, **kw):
  return optax_prune.uncompact(optax_prune.compact(params, masks, **kw))


def _check(params, masks, out_params, out_masks):
  for name in params:
    mask = masks[name]
    if isinstance(mask, optax.MaskedNode):
      assert isinstance(out_masks[name], optax.MaskedNode)
      _assert_bitwise_equal(out_params[name], params[name])
      continue
    _assert_bitwise_equal(out_params[name], _masked(params[name], mask))
    np.testing.assert_array_equal(np.asarray(out_masks[name]), np.asarray(mask))
    assert np.asarray(out_masks[name]).dtype == np.bool_


# compact / uncompact in memory.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_round_trip_is_bitwise_for_each_dtype(dtype):
  rng = np.random.default_rng(0)
  with _x64() if dtype == "float64" else contextlib.nullcontext():
    dt = jnp.dtype(dtype)
    x, mask = _leaf(rng, (5, 11), dt)
    for as_jax in (False, True):
      params = {"w": jnp.asarray(x) if as_jax else x, "b": np.ones(3, dt)}
      masks = {"w": jnp.asarray(mask) if as_jax else mask, "b": optax.MaskedNode()}
      small = optax_prune.compact(params, masks)
      w = small["w"]
      assert isinstance(w, optax_prune.CompactLeaf)
      assert isinstance(w.values, jax.Array) == as_jax
      # The layout, against NumPy: packed rows, kept values row-major, header.
      np.testing.assert_array_equal(np.asarray(w.bits), np.packbits(mask, axis=-1))
      _assert_bitwise_equal(w.values, x[mask])
      np.testing.assert_array_equal(np.asarray(w.header), [2, 5, 11, 1, 1, mask.sum()])
      _check(params, masks, *optax_prune.uncompact(small))


def test_kept_zeros_are_kept_by_the_mask_not_the_value():
  x = np.array([[0.0, 0.0, 3.0], [-0.0, 5.0, 0.0]], np.float32)
  mask = np.array([[True, False, True], [True, False, False]])
  small = optax_prune.compact({"w": x}, {"w": mask})
  _assert_bitwise_equal(small["w"].values, np.array([0.0, 3.0, -0.0], np.float32))
  params, masks = optax_prune.uncompact(small)
  np.testing.assert_array_equal(masks["w"], mask)
  _assert_bitwise_equal(params["w"], _masked(x, mask))


@pytest.mark.parametrize("shape", [(), (1,), (7,), (9,), (0,), (0, 3), (3, 0), (2, 1, 17)])
@pytest.mark.parametrize("keep", ["all", "none", "some"])
def test_small_empty_and_extreme_leaves(shape, keep):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(shape).astype(np.float32)
  mask = {"all": np.ones(shape, bool), "none": np.zeros(shape, bool),
          "some": rng.random(shape) < 0.5}[keep]
  small = optax_prune.compact({"w": x}, {"w": mask})
  w = small["w"]
  assert w.bits.shape == _bits.packed_shape(shape)
  assert w.values.shape == (max(1, int(mask.sum())),)  # Never zero-size (orbax).
  _check({"w": x}, {"w": mask}, *optax_prune.uncompact(small))
  jax_params = {"w": jnp.asarray(x)}
  _check(jax_params, {"w": mask}, *_round_trip(jax_params, {"w": jnp.asarray(mask)}))


def test_packed_uint8_masks_are_accepted():
  rng = np.random.default_rng(2)
  x, mask = _leaf(rng, (3, 13), np.float32)
  packed = _bits.pack_np(mask)
  assert packed.dtype == np.uint8 and packed.shape == _bits.packed_shape(x.shape)
  for m in (packed, jnp.asarray(packed)):
    _check({"w": x}, {"w": mask}, *_round_trip({"w": jnp.asarray(x)}, {"w": m}))
  scalar = optax_prune.compact({"s": np.float32(2.0)}, {"s": _bits.pack_np(np.array(True))})
  assert float(optax_prune.uncompact(scalar)[0]["s"]) == 2.0


def _nm_mask(rng, shape, n, m, axis, p=0.7):
  mask = np.moveaxis(rng.random(shape) < p, axis, -1)
  grouped = mask.reshape(mask.shape[:-1] + (mask.shape[-1] // m, m))
  grouped = grouped & (np.cumsum(grouped, axis=-1) <= n)
  return np.moveaxis(grouped.reshape(mask.shape), -1, axis)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_nm_leaves_use_to_nm_layout_and_others_fall_back_to_bits(dtype):
  rng = np.random.default_rng(3)
  nm = optax_prune.n_of_m(2, 4, axis=0)
  x = rng.standard_normal((8, 6)).astype(dtype)
  fits = _nm_mask(rng, x.shape, 2, 4, 0)
  fits[0, 0], x[0, 0] = True, 0  # A kept zero, not padding.
  fits[4:8, 1] = False  # A group keeping nothing.
  over = fits.copy()
  over[:3, 2] = True  # 3 of 4 kept in one group: not 2:4.
  params = {"fits": x, "over": x.copy(), "odd": x[:6], "vector": x[:, 0].copy()}
  masks = {"fits": fits, "over": over, "odd": fits[:6], "vector": fits[:, 0].copy()}
  small = optax_prune.compact(params, masks, nm=nm)
  assert isinstance(small["fits"], optax_prune.CompactNMLeaf)
  assert isinstance(small["vector"], optax_prune.CompactNMLeaf)
  assert isinstance(small["over"], optax_prune.CompactLeaf)
  assert isinstance(small["odd"], optax_prune.CompactLeaf)  # 6 rows: not groups of 4.
  want = optax_prune.to_nm(jnp.asarray(x), jnp.asarray(fits), nm)
  _assert_bitwise_equal(small["fits"].values, want.values)
  np.testing.assert_array_equal(small["fits"].indices, want.indices)
  _check(params, masks, *optax_prune.uncompact(small))
  jax_params = jax.tree.map(jnp.asarray, params)
  _check(params, masks, *_round_trip(jax_params, jax.tree.map(jnp.asarray, masks), nm=nm))


def test_compact_bytes_meet_the_size_targets():
  """Bit layout <= (1 - s) + 1/32 + 1% of dense float32; 2:4 <= 0.66."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((256, 256)).astype(np.float32)
  nbytes = lambda tree: sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree))
  for s in (0.5, 0.9):
    mask = np.zeros(x.size, bool)
    mask[rng.permutation(x.size)[:round((1 - s) * x.size)]] = True
    small = optax_prune.compact({"w": x}, {"w": mask.reshape(x.shape)})
    assert nbytes(small) <= ((1 - s) + 1 / 32 + 0.01) * x.nbytes
  nm = optax_prune.n_of_m(2, 4, axis=0)
  small = optax_prune.compact({"w": x}, {"w": _nm_mask(rng, x.shape, 2, 4, 0, p=1.0)}, nm=nm)
  assert isinstance(small["w"], optax_prune.CompactNMLeaf)
  assert nbytes(small) <= 0.66 * x.nbytes


@st.composite
def _cases(draw):
  ndim = draw(st.integers(0, 3))
  shape = tuple(draw(st.integers(0, 4 if i < ndim - 1 else 19)) for i in range(ndim))
  dtype = draw(st.sampled_from([np.float32, np.float16, jnp.bfloat16]))
  p = draw(st.sampled_from([0.0, 0.3, 1.0]))
  seed = draw(st.integers(0, 2**32 - 1))
  nm = draw(st.sampled_from([None, (1, 2), (2, 4)]))
  return shape, dtype, p, seed, nm


@given(_cases())
def test_random_leaves_round_trip_exactly(case):
  shape, dtype, p, seed, nm = case
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(dtype)
  mask = rng.random(shape) < p
  pattern = None
  if nm is not None and shape:
    pattern = optax_prune.n_of_m(*nm, axis=-1)
    if shape[-1] % nm[1] == 0:
      mask = _nm_mask(rng, shape, *nm, -1, p)
  params, masks = {"w": x, "b": x}, {"w": mask, "b": optax.MaskedNode()}
  _check(params, masks, *_round_trip(params, masks, nm=pattern))


def test_errors_name_the_argument():
  params = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="`masks`.*bool array.*packed uint8"):
    optax_prune.compact(params, {"w": jnp.ones((3, 2), bool)})
  with pytest.raises(ValueError, match="`masks`"):
    optax_prune.compact(params, {"w": jnp.ones((2, 3))})
  with pytest.raises(ValueError, match="`masks`"):
    optax_prune.compact(params, {"v": jnp.ones((2, 3), bool)})
  with pytest.raises(ValueError, match="`nm`"):
    optax_prune.compact(params, {"w": jnp.ones((2, 3), bool)}, nm=optax_prune.blocks((2, 2)))
  with pytest.raises(ValueError, match="outside `jax.jit`"):
    jax.jit(optax_prune.compact)(params, {"w": jnp.ones((2, 3), bool)})
  small = optax_prune.compact(params, {"w": jnp.ones((2, 3), bool)})
  with pytest.raises(ValueError, match="outside `jax.jit`"):
    jax.jit(optax_prune.uncompact)(small)


def test_inconsistent_compact_leaves_are_refused():
  x, mask = _leaf(np.random.default_rng(5), (4, 9), np.float32)
  leaf = optax_prune.compact({"w": x}, {"w": mask})["w"]
  header = np.asarray(leaf.header).copy()
  header[-1] -= 1  # One fewer kept than bits set.
  cases = {
      "mask bits set, its header says": leaf._replace(header=header),
      "values have shape": leaf._replace(values=leaf.values[:-1]),
      "bits are": leaf._replace(bits=leaf.bits[:, :1]),
      "header is not int32": leaf._replace(header=header.astype(np.int64)),
  }
  for message, bad in cases.items():
    with pytest.raises(ValueError, match=rf"\['w'\].*{message}"):
      optax_prune.uncompact({"w": bad})
  nm_leaf = optax_prune.compact(
      {"w": x[:, :8]}, {"w": _nm_mask(np.random.default_rng(6), (4, 8), 1, 2, -1)},
      nm=optax_prune.n_of_m(1, 2, axis=-1))["w"]
  bad_indices = nm_leaf._replace(indices=np.full_like(nm_leaf.indices, 7))
  with pytest.raises(ValueError, match=r"\['w'\].*N:M data is corrupted"):
    optax_prune.uncompact({"w": bad_indices})


# On disk, with orbax.


def _params_and_masks():
  rng = np.random.default_rng(7)
  w, w_mask = _leaf(rng, (6, 12), np.float32)
  h, h_mask = _leaf(rng, (8, 4), jnp.bfloat16)
  h_mask = _nm_mask(rng, h.shape, 2, 4, 0)
  params = {"dense": {"kernel": jnp.asarray(w), "bias": jnp.arange(12.0)},
            "nm": jnp.asarray(h), "scalar": jnp.float32(3.0), "empty": jnp.zeros((0, 5)),
            "empty_pruned": jnp.zeros((3, 0)), "none_kept": jnp.ones((2, 9), jnp.float16),
            "list": [jnp.ones(2), (jnp.full((2, 2), 2.0),)]}
  masks = {"dense": {"kernel": jnp.asarray(w_mask), "bias": optax.MaskedNode()},
           "nm": jnp.asarray(h_mask), "scalar": jnp.array(True),
           "empty": optax.MaskedNode(), "empty_pruned": jnp.zeros((3, 0), bool),
           "none_kept": jnp.zeros((2, 9), bool),
           "list": [optax.MaskedNode(), (jnp.eye(2, dtype=bool),)]}
  return params, masks


def _flat(tree):
  return jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]


def test_save_and_load_round_trip(tmp_path):
  params, masks = _params_and_masks()
  optax_prune.save_compact(tmp_path / "ckpt", params, masks, nm=optax_prune.n_of_m(2, 4, axis=0))
  like = jax.eval_shape(lambda: params)
  loaded, loaded_masks = optax_prune.load_compact(tmp_path / "ckpt", like)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for (path, x), (_, mask), (_, got), (_, got_mask) in zip(
      _flat(params), _flat(masks), _flat(loaded), _flat(loaded_masks)):
    assert isinstance(got, jax.Array), path
    if isinstance(mask, optax.MaskedNode):
      assert isinstance(got_mask, optax.MaskedNode), path
      _assert_bitwise_equal(got, x)
    else:
      _assert_bitwise_equal(got, _masked(x, mask))
      np.testing.assert_array_equal(np.asarray(got_mask), np.asarray(mask))
  # Saving again needs `force`.
  with pytest.raises(Exception):
    optax_prune.save_compact(tmp_path / "ckpt", params, masks)
  optax_prune.save_compact(tmp_path / "ckpt", params, masks, force=True)


def test_loading_for_other_params_or_corrupted_data_is_a_clear_error(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  params, masks = _params_and_masks()
  path = tmp_path / "ckpt"
  optax_prune.save_compact(path, params, masks, nm=optax_prune.n_of_m(2, 4, axis=0))
  like = jax.eval_shape(lambda: params)

  def other(**changes):
    tree = dict(like)
    tree.update(changes)
    return tree

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  cases = [
      (other(dense={"kernel": f32(6, 13), "bias": f32(12)}), r"\['kernel'\].*shape \(6, 12\).*\(6, 13\)"),
      (other(dense={"kernel": f32(6, 12), "bias": f32(13)}), r"\['bias'\].*shape \(12,\).*\(13,\)"),
      (other(dense={"kernel": jax.ShapeDtypeStruct((6, 12), jnp.bfloat16), "bias": f32(12)}),
       r"\['kernel'\].*dtype float32.*bfloat16"),
      (other(nm=f32(8, 4)), r"\['nm'\].*dtype bfloat16.*float32"),
      (other(nm=jax.ShapeDtypeStruct((4, 8), jnp.bfloat16)), r"\['nm'\].*shape \(8, 4\).*\(4, 8\)"),
      (other(empty=f32(2, 5)), r"\['empty'\].*empty leaf"),
      (other(extra=f32(3)), r"\['extra'\].*no leaf there"),
      ({k: v for k, v in like.items() if k != "scalar"}, r"leaves that `like` does not: \['scalar'\]"),
  ]
  for bad_like, message in cases:
    with pytest.raises(ValueError, match=message):
      optax_prune.load_compact(path, bad_like)

  # A corrupted file: one kept count off, written with orbax directly.
  small = optax_prune.compact({"w": params["dense"]["kernel"]}, {"w": masks["dense"]["kernel"]})
  header = np.asarray(small["w"].header).copy()
  header[-1] -= 1
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "bad", {"w": small["w"]._replace(header=jnp.asarray(header))})
  checkpointer.wait_until_finished()
  checkpointer.close()
  with pytest.raises(ValueError, match=r"\['w'\].*bits set.*corrupted"), pytest.warns(
      UserWarning, match="no checksums"):
    optax_prune.load_compact(tmp_path / "bad", {"w": params["dense"]["kernel"]})


def test_split_leaves_on_8_faked_devices(tmp_path):
  """See tests/compact_sharding_checks.py: one subprocess, 8 CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"))
  proc = subprocess.run(
      [sys.executable, "-m", "tests.compact_sharding_checks", str(tmp_path)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  results_path = tmp_path / "results.json"
  assert proc.returncode == 0 and results_path.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
  results = json.loads(results_path.read_text())
  assert len(results) == 9
  failed = {k: v["detail"] for k, v in results.items() if not v["ok"]}
  assert not failed, failed


def test_a_missing_or_unreadable_checkpoint_says_so(tmp_path):
  params, masks = _params_and_masks()
  like = jax.eval_shape(lambda: params)
  with pytest.raises(FileNotFoundError, match="no compact checkpoint at .*no such directory"):
    optax_prune.load_compact(tmp_path / "missing", like)
  path = tmp_path / "ckpt"
  optax_prune.save_compact(path, params, masks)
  (path / "_METADATA").write_text("garbage{")  # Damaged, not a structure mismatch.
  with pytest.raises(ValueError, match=r"no readable compact checkpoint: its metadata"):
    optax_prune.load_compact(path, like)


def _data_files(path):
  return sorted((f for f in path.rglob("*") if f.is_file() and f.parent.name == "d"),
                key=lambda f: f.stat().st_size)


def test_damaged_bytes_are_refused_and_old_files_load_with_a_warning(tmp_path):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((128, 96)).astype(np.float32)
  params = {"w": jnp.asarray(w), "b": jnp.asarray(rng.standard_normal(96).astype(np.float32))}
  masks = {"w": jnp.asarray(np.abs(w) > 0.5), "b": optax.MaskedNode()}
  like = jax.eval_shape(lambda: params)
  expected = np.where(np.abs(w) > 0.5, w, 0)

  def saved(name):
    path = tmp_path / name
    optax_prune.save_compact(path, params, masks)
    return path

  # Bytes overwritten in the middle of the largest data file, its size kept:
  # 16 flipped bytes, then a run of random ones.
  for name, size in [("flipped", 16), ("overwritten", 4096)]:
    path = saved(name)
    data_file = _data_files(path)[-1]
    data = bytearray(data_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + size] = (np.frombuffer(data[middle:middle + size], np.uint8)
                                  ^ rng.integers(1, 256, size, dtype=np.uint8)).tobytes()
    data_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged"):
      optax_prune.load_compact(path, like)

  # Truncated: one clear message, not orbax's pages of TensorStore specs, and
  # nothing printed later by the reads orbax abandons (collected tasks, late
  # TensorStore callbacks on its closed loop): CI once failed on those.
  path = saved("truncated")
  data_file = _data_files(path)[-1]
  data_file.write_bytes(data_file.read_bytes()[:100])
  reports, records = [], []
  handler = logging.Handler()
  handler.emit = records.append
  logging.getLogger("asyncio").addHandler(handler)
  previous_hook, sys.unraisablehook = sys.unraisablehook, reports.append
  try:
    for _ in range(5):
      with pytest.raises(ValueError, match=r"could not read the arrays of .*damaged or"
                         r" truncated \([^\n]*\)\. Save it again") as error:
        optax_prune.load_compact(path, like)
      assert "TensorStore" not in str(error.value)
    time.sleep(0.2)
    gc.collect()
  finally:
    sys.unraisablehook = previous_hook
    logging.getLogger("asyncio").removeHandler(handler)
  assert not reports, [f"{r.exc_value!r} in {r.object!r}"[:300] for r in reports]
  assert not records, [r.getMessage()[:300] for r in records]

  # A recorded checksum that differs names the leaf and its array.
  path = saved("recorded")
  record = json.loads((path / "_CHECKPOINT_METADATA").read_text())
  record["custom_metadata"]["optax_prune"]["crc32"]["['w'].values"][0][1] ^= 1
  (path / "_CHECKPOINT_METADATA").write_text(json.dumps(record))
  with pytest.raises(ValueError, match=r"the leaf at \['w'\]\.values: its bytes do not match"
                     r" the checksum.*damaged"):
    optax_prune.load_compact(path, like)

  # Written without checksums (before they existed): loads, with a warning.
  path = saved("old")
  record = json.loads((path / "_CHECKPOINT_METADATA").read_text())
  del record["custom_metadata"]["optax_prune"]
  (path / "_CHECKPOINT_METADATA").write_text(json.dumps(record))
  with pytest.warns(UserWarning, match=r"holds no checksums.*loaded unverified.*Save it again"):
    loaded, _ = optax_prune.load_compact(path, like)
  np.testing.assert_array_equal(np.asarray(loaded["w"]), expected)
  # Undamaged: loads exactly, without a warning (warnings are errors here).
  loaded, _ = optax_prune.load_compact(saved("intact"), like)
  np.testing.assert_array_equal(np.asarray(loaded["w"]), expected)
  np.testing.assert_array_equal(np.asarray(loaded["b"]), np.asarray(params["b"]))


@given(st.lists(st.integers(1, 5), min_size=0, max_size=3), st.data())
def test_checksums_are_verified_block_by_block_across_other_splits(shape, data):
  """``_verify`` reads every saved block from the overlapping loaded shards.

  Reference: NumPy's own CRC32 of each block (zlib on the block's bytes).
  Loaded as one host array here; the 8-device checks load into other splits.
  """
  import zlib  # pylint: disable=import-outside-toplevel
  from optax_prune import _compact  # pylint: disable=import-outside-toplevel

  x = np.asarray(np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) * 0.5 - 1.0)
  splits = [data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
            for n in shape]
  blocks = []
  for starts in np.ndindex(*splits):
    index = [(i * n // g, (i + 1) * n // g) for i, n, g in zip(starts, shape, splits)]
    block = x[tuple(slice(a, b) for a, b in index)]
    blocks.append([[list(i) for i in index], zlib.crc32(np.ascontiguousarray(block).tobytes())])
  _compact._verify("the leaf at ['x']", x, blocks)  # pylint: disable=protected-access
  if x.size:
    damaged = x.copy()
    flat_index = data.draw(st.integers(0, x.size - 1))
    damaged.reshape(-1)[flat_index] += 1.0
    number = next(i for i, (index, _) in enumerate(blocks)
                  if all(a <= u < b for (a, b), u in
                         zip(index, np.unravel_index(flat_index, shape))))
    message = r"\['x'\]:" + (f" shard {number} of {len(blocks)}" if len(blocks) > 1 else "")
    with pytest.raises(ValueError, match=message):
      _compact._verify("the leaf at ['x']", damaged, blocks)  # pylint: disable=protected-access
