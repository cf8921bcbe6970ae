"""Compact save/load of params split over 8 faked CPU devices, in its own process.

Run by ``tests/test_compact.py`` as ``python -m tests.compact_sharding_checks
OUT_DIR`` with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``: on a
1-D mesh of 8 and a (4, 2) mesh, leaves split along rows, columns (byte
aligned and not), both axes, or one axis and replicated on the other, are
compacted, uncompacted, and saved and loaded with orbax, against NumPy. While
the library runs, every conversion of a device array to NumPy is recorded:
none may hold more than one shard of a split leaf. Writes ``results.json``
(one pass/fail entry per check) to OUT_DIR.

Nothing runs at import: pytest imports this module to collect doctests.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_prune

# name: (mesh shape, mesh axes, leaf shape, spec, dtype). Pruned leaves.
CASES = {
    "rows-8": ((8,), ("x",), (64, 24), P("x", None), np.float32),
    "cols-8-aligned": ((8,), ("x",), (4, 128), P(None, "x"), np.float32),
    "cols-8-unaligned": ((8,), ("x",), (4, 40), P(None, "x"), jnp.bfloat16),
    "vector-8": ((8,), ("x",), (96,), P("x"), np.float32),
    "rows-4-replicated-2": ((4, 2), ("data", "model"), (32, 16), P("data", None), np.float32),
    "cols-2-replicated-4": ((4, 2), ("data", "model"), (8, 12), P(None, "model"), np.float16),
    "both-4x2": ((4, 2), ("data", "model"), (16, 64), P("data", "model"), np.float32),
    "replicated": ((4, 2), ("data", "model"), (6, 10), P(), np.float32),
}


@contextlib.contextmanager
def host_reads():
  """Records the shape of every device array the code converts to NumPy."""
  impl = type(jnp.zeros(1))
  original = impl.__array__
  shapes = []

  def record(self, *args, **kwargs):
    shapes.append(tuple(self.shape))
    return original(self, *args, **kwargs)

  impl.__array__ = record
  try:
    yield shapes
  finally:
    impl.__array__ = original


def host_case(name, seed):
  _, _, shape, _, dtype = CASES[name]
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(dtype)
  mask = rng.random(shape) < 0.3
  x.flat[0], mask.flat[0] = 0, True  # A kept zero.
  if name == "rows-8":
    mask[:8] = False  # One shard keeps nothing.
  return x, mask


def bits_of(x):
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def problems_of(name, got, got_masks, x, mask, sharding):
  problems = []
  want = np.where(mask, x, np.zeros((), x.dtype))
  placed, got = got, np.asarray(got)
  if got.dtype != x.dtype or not np.array_equal(bits_of(got), bits_of(want)):
    problems.append(f"{name}: values differ from np.where(mask, x, 0)")
  if not np.array_equal(np.asarray(got_masks), mask):
    problems.append(f"{name}: masks differ")
  for what, a in (("params", placed), ("masks", got_masks)):
    if not a.sharding.is_equivalent_to(sharding, a.ndim):
      problems.append(f"{name}: {what} placed {a.sharding}, not {sharding}")
  return problems


def too_large(name, shapes, shard_size):
  """Host reads larger than one shard (the test's own reads are not recorded)."""
  big = [s for s in shapes if math.prod(s) > shard_size]
  return [f"{name}: read {big} on the host (a shard has {shard_size} entries)"] if big else []


def run(out_dir: str) -> dict:
  assert jax.device_count() == 8, jax.devices()
  results = {}

  def check(label, fn):
    try:
      problems = fn()
    except Exception:  # pylint: disable=broad-except
      problems = [traceback.format_exc(limit=-6)]
    results[label] = {"ok": not problems, "detail": "; ".join(problems)}
    print(("PASS " if not problems else "FAIL ") + label + ("" if not problems else f": {problems}"),
          flush=True)

  placed = {}
  for i, (name, (mesh_shape, axes, shape, spec, _)) in enumerate(CASES.items()):
    mesh = jax.make_mesh(mesh_shape, axes)
    sharding = NamedSharding(mesh, spec)
    x, mask = host_case(name, i)
    placed[name] = (x, mask, sharding, jax.device_put(x, sharding), jax.device_put(mask, sharding))

  def one_case(name):
    x, mask, sharding, xd, md = placed[name]
    shard_size = math.prod(sharding.shard_shape(x.shape))
    with host_reads() as shapes:
      small = optax_prune.compact({"w": xd}, {"w": md})["w"]
      params, masks = optax_prune.uncompact({"w": small})
    problems = too_large(name, shapes, shard_size) if shard_size < x.size else []
    problems += problems_of(name, params["w"], masks["w"], x, mask, sharding)
    if not isinstance(small, optax_prune.CompactLeaf):
      return problems + [f"{name}: not a CompactLeaf"]
    if not small.bits.sharding.is_equivalent_to(sharding, small.bits.ndim):
      problems.append(f"{name}: bits placed {small.bits.sharding}, not like the param")
    # Each device holds its own shard's row of values (NumPy reference).
    index_map = sharding.devices_indices_map(x.shape)
    for shard in small.values.addressable_shards:
      own = index_map[shard.device]
      want = x[own][mask[own]]
      row = np.asarray(shard.data)
      row = row.reshape(-1, row.shape[-1])
      if shard_size < x.size and row.shape[0] != 1:
        problems.append(f"{name}: device {shard.device.id} holds {row.shape[0]} rows of values")
      if not np.array_equal(bits_of(row[0][:want.size]), bits_of(want)):
        problems.append(f"{name}: device {shard.device.id} holds other values than its shard's")
    if shard_size < x.size:
      counts = np.asarray(small.header)[1 + 2 * x.ndim:]
      want_counts = sorted(int(mask[idx].sum()) for idx in
                           {tuple((s.start, s.stop) for s in v): v for v in index_map.values()}.values())
      if sorted(counts.tolist()) != want_counts:
        problems.append(f"{name}: kept counts {counts} for {want_counts}")
    # The optimizer state's packed layout gives the same compact leaf.
    packed = np.packbits(mask, axis=-1)
    try:  # With the param's spec when the packed axis divides, else replicated.
      packed = jax.device_put(packed, sharding)
    except ValueError:
      packed = jax.device_put(packed, NamedSharding(sharding.mesh, P()))
    again = optax_prune.compact({"w": xd}, {"w": packed})["w"]
    for a, b in zip(again, small):
      if not np.array_equal(bits_of(a), bits_of(b)):
        problems.append(f"{name}: a packed mask gives another compact leaf")
    return problems

  for name in CASES:
    check(f"round-trip-{name}", lambda name=name: one_case(name))

  def orbax_round_trip():
    problems = []
    params = {n: placed[n][3] for n in CASES}
    params["bias"] = jax.device_put(np.arange(8, dtype=np.float32), placed["rows-8"][2].mesh.devices.flat[0])
    masks = {n: placed[n][4] for n in CASES}
    masks["bias"] = optax.MaskedNode()
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
    path = os.path.join(out_dir, "ckpt")
    largest_shard = max(math.prod(placed[n][2].shard_shape(placed[n][0].shape)) for n in CASES
                        if n != "replicated")
    with host_reads() as shapes:
      optax_prune.save_compact(path, params, masks)
      loaded, loaded_masks = optax_prune.load_compact(path, like)
    # The replicated leaf and the bias are whole everywhere: read whole.
    whole = {placed["replicated"][0].shape, (8,)}
    problems += too_large("orbax", [s for s in shapes if s not in whole], largest_shard)
    for n in CASES:
      x, mask, sharding = placed[n][:3]
      problems += problems_of(f"orbax {n}", loaded[n], loaded_masks[n], x, mask, sharding)
    if not isinstance(loaded_masks["bias"], optax.MaskedNode):
      problems.append("orbax: the bias got a mask")
    if not np.array_equal(np.asarray(loaded["bias"]), np.arange(8)):
      problems.append("orbax: the bias differs")
    # Loaded onto one device (no shardings in `like`): assembled on the host.
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    single, single_masks = optax_prune.load_compact(path, one)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for n in CASES:
      x, mask = placed[n][:2]
      problems += problems_of(f"one device {n}", single[n], single_masks[n], x, mask, device)
    # Loaded into another split of the same leaf: assembled on the host, then placed.
    other = dict(like)
    other_sharding = NamedSharding(placed["both-4x2"][2].mesh, P("model", "data"))
    other["both-4x2"] = jax.ShapeDtypeStruct(like["both-4x2"].shape, like["both-4x2"].dtype,
                                             sharding=other_sharding)
    resplit, resplit_masks = optax_prune.load_compact(path, other)
    x, mask = placed["both-4x2"][:2]
    problems += problems_of("resplit", resplit["both-4x2"],
                            resplit_masks["both-4x2"], x, mask, other_sharding)
    # A damaged shard is named, loaded in place or into another split.
    record_path = os.path.join(path, "_CHECKPOINT_METADATA")
    with open(record_path) as f:
      record = json.load(f)
    blocks = record["custom_metadata"]["optax_prune"]["crc32"]["['both-4x2'].values"]
    blocks[5][1] ^= 1
    with open(record_path, "w") as f:
      json.dump(record, f)
    for name, target in [("in place", like), ("resplit", other)]:
      try:
        optax_prune.load_compact(path, target)
        problems.append(f"a damaged shard loaded {name}")
      except ValueError as e:
        if f"['both-4x2'].values: shard 5 of {len(blocks)}" not in str(e):
          problems.append(f"a damaged shard loaded {name}: {e}")
    return problems

  check("orbax-round-trip", orbax_round_trip)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit(__doc__)
  run(sys.argv[1])
