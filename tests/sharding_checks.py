"""Sharded pruning checks, run in their own processes by ``tests/test_sharding.py``.

Faked CPU devices must be configured before JAX starts, so these checks cannot
run in the main pytest process. Two entry points, run from the repository root:

* ``python -m tests.sharding_checks mesh OUT.json`` on 8 CPU devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=8``): on a 2 x 4
  ``("data", "model")`` mesh holding an FSDP leaf (largest axis over all 8
  devices), a 2D leaf, a leaf split on one axis, and replicated small leaves,
  with Auto and with Explicit mesh axes, trains a few pruned steps for every
  scope and threshold method; compares masks with a one-device run and with
  the NumPy reference, checks the state's shardings, and reads the compiled
  HLO for cross-device ops. Writes one pass/fail result per named check.
* ``python -m tests.sharding_checks worker ID PORT OUT_DIR``: process ``ID``
  of two joined by ``jax.distributed.initialize`` on localhost, 2 CPU devices
  each; trains a pruned MLP whose params are split across both processes and
  a one-device copy of it, and saves both runs' masks. Exits with
  ``SKIP_EXIT_CODE`` (printing the reason) when this JAX cannot run CPU
  collectives across processes.

Nothing runs at import: pytest imports this module to collect doctests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_prune
from optax_prune import _placement
from tests import reference

AXES = ("auto", "explicit")  # Mesh axis types: GSPMD propagation or sharding in types.
SCOPES = ("layer", "global")
# "auto" picks bisect for these leaves (all under 2**15 entries) and sort for
# the small whole one: with "histogram" every method runs on the meshes.
METHODS = ("sort", "histogram", "auto")
STEPS = 3
SKIP_EXIT_CODE = 77
# A cross-device op in compiled HLO text: "= TYPE op(" or its async "op-start(".
_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all"
    r"|collective-permute|collective-broadcast|ragged-all-to-all)(?:-start)?\("
)
# Mask updates at steps 0, 1, 2 to sparsities 0.3, 0.69375, 0.75.
SCHEDULE = optax_prune.polynomial_schedule(
    0.75, begin_step=0, end_step=2, frequency=1, initial_sparsity=0.3
)
# Leaf: (shape, spec on the ("data", "model") mesh). Pruned: ndim >= 2.
LEAVES = {
    "embed": ((512, 32), P(("data", "model"), None)),  # FSDP: largest axis.
    "mlp": ((32, 128), P("data", "model")),  # 2D.
    # Its twin (one shape and placement): both ranked by one kernel in a loop.
    "mlp_twin": ((32, 128), P("data", "model")),
    # Under 2048 entries and split on "model", replicated over "data":
    # threshold="auto" must not sort it (a sort gathers).
    "small_split": ((16, 64), P(None, "model")),
    "small_whole": ((6, 10), P()),  # Replicated: "auto" may sort it.
    "bias": ((128,), P()),  # Not pruned.
    # A scanned stack of 4 layers (`layer_axis=0`), its layer axis split over
    # "data" and each layer's outputs over "model": each layer is ranked on
    # its own (layer scope), each device its own layers.
    "stack": ((4, 32, 64), P("data", None, "model")),
}
LAYER_AXIS = optax_prune.by_path({"stack": 0}, default=None)


# Structured granularities on the same placed leaves (the (6, 10) leaf stays
# unstructured: 6 and 10 are not multiples of 4), with a score of each kind.
STRUCTURED = {
    "n_of_m": (optax_prune.n_of_m(2, 4, axis=0), "magnitude"),
    "blocks": (optax_prune.blocks((4, 4), reduce="max"), "saliency"),
    "channels": (optax_prune.channels(axis=-1), "random"),
}


def config_names() -> list[str]:
  """Every axis types x scope x method configuration, as ``axes-scope-method``."""
  return [f"{a}-{s}-{m}" for a in AXES for s in SCOPES for m in METHODS]


def check_names() -> list[str]:
  """Names of the results ``mesh`` writes; ``tests/test_sharding.py`` has one test each."""
  names = [f"init-shardings-{a}" for a in AXES] + ["memory-bisect-global"]
  # Explicit axes only: there a unit reshape of a split leaf is an error unless
  # handled; under Auto axes XLA reshards on its own.
  names += [f"structured-explicit-{g}" for g in STRUCTURED]
  names += [f"packed-masks-{a}" for a in AXES]
  names += [f"prune-one-shot-{a}" for a in AXES]
  names += [f"sparsegpt-{c}-{a}" for a in AXES for c in sparsegpt_configs(a)]
  names += [f"{check}-{method}-{a}" for a in AXES for method in SPARSE_TRAINING
            for check in ("sparse-training", "no-gather")]
  for config in config_names():
    names += [f"masks-{config}"]
    names += [f"shardings-{config}"] if _placement_checked(config) else []
    names += [f"no-gather-{config}"] if not config.endswith("-sort") else []
  return names


def _placement_checked(config: str) -> bool:
  # The sort reference gathers split leaves by design. Under Auto axes that
  # leaves the placement of its outputs to XLA, which may move params and
  # moments (seen: replicated leaves split over "data"); pin `out_shardings`
  # there. Its placements are reported in the info, not checked.
  return config != "auto-layer-sort" and config != "auto-global-sort"


def host_params(seed: int = 0) -> dict[str, np.ndarray]:
  """Float32 params on a grid of quarters: many exact ties and zeros to break."""
  rng = np.random.default_rng(seed)
  return {
      name: (np.round(rng.standard_normal(shape) * 4) / 4).astype(np.float32)
      for name, (shape, _) in LEAVES.items()
  }


def make_mesh(axes: str) -> jax.sharding.Mesh:
  kind = AxisType.Auto if axes == "auto" else AxisType.Explicit
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))


def mesh_context(mesh, axes: str):
  # Explicit axes need the mesh in context for jit; Auto axes are used as most
  # GSPMD code does, with shardings only on the arrays.
  return jax.set_mesh(mesh) if axes == "explicit" else contextlib.nullcontext()


def make_tx(scope: str, method: str, packed: bool = False):
  return optax.chain(
      optax.adam(0.1),
      # Uniform: the NumPy reference prunes each leaf at the scheduled sparsity.
      optax_prune.magnitude_pruning(SCHEDULE, scope=scope, threshold=method,
                                    distribution="uniform", packed_masks=packed,
                                    layer_axis=LAYER_AXIS),
  )


def train_step(tx):
  def step(params, opt_state):
    # Elementwise pseudo-gradients give the same bits on any sharding, so the
    # sharded run must match the one-device run exactly, params included.
    grads = jax.tree.map(lambda p: 0.5 * p + 0.125, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def collectives(hlo: str) -> list[tuple[str, str]]:
  """(op, result type) of every cross-device op in compiled HLO text."""
  found = []
  for line in hlo.splitlines():
    match = _COLLECTIVE.search(line)
    if match:
      found.append((match.group(2), match.group(1)))
  return found


def _only_counts(op: str, result_type: str, method: str) -> bool:
  """Whether a collective of a mask update moves only counts, never a leaf.

  Bisect: a few integers per round. Histogram: integer scalars (the per-step
  counts), uint32 histograms of 2**16 and
  2**15 counts (larger than any leaf here; one per layer of a stack ranked
  per layer) and, for split ties, two levels of about sqrt(leaf size) counts
  (per layer); a leaf of keys (up to 2**14 entries here) would be neither.
  """
  arrays = re.findall(r"(\w+)\[([0-9,]*)\]", result_type)
  if all(dtype in ("u32", "s32") and elements(f"[{dims}]") <= 16 for dtype, dims in arrays):
    # A few integers: under Auto axes XLA may split the count vector of a
    # stack whose layer axis is split and move it with any collective.
    return True
  if op != "all-reduce":
    return False
  if method in ("histogram", "auto"):  # "auto" picks histogram for the global group.
    histograms = {n * size for n in range(1, 5) for size in (2**16, 2**15)}
    return all(dtype in ("u32", "s32") and (elements(f"[{dims}]") in histograms
                                           or elements(f"[{dims}]") <= 1024)
               for dtype, dims in arrays)
  return elements(result_type) <= 16


def elements(result_type: str) -> int:
  """Total entries of an HLO result type: ``(u32[], u32[1]{0})`` -> 2."""
  return sum(
      int(np.prod([int(d) for d in dims.split(",") if d]))
      for dims in re.findall(r"\[([0-9,]*)\]", result_type)
  )


def mask_leaves(opt_state) -> dict:
  masks = optax_prune.find_pruning_state(opt_state).masks
  return {n: m for n, m in masks.items() if not isinstance(m, optax.MaskedNode)}


def reference_masks(params: dict, scope: str, sparsity) -> dict:
  """NumPy reference masks; global scope ranks leaves in the params' order
  (a stack's layers in order), layer scope each leaf and each layer of the
  stack on its own."""
  pruned = [n for n in sorted(params) if params[n].ndim >= 2]
  if scope == "layer":
    per_layer = lambda x: np.stack([reference.keep_masks([y], sparsity)[0] for y in x])
    return {n: per_layer(params[n]) if n == "stack" else
            reference.keep_masks([params[n]], sparsity)[0] for n in pruned}
  return dict(zip(pruned, reference.keep_masks([params[n] for n in pruned], sparsity)))


def run_one_device(scope: str) -> list[tuple[dict, dict]]:
  """(masks, params) after each step of the unsharded run, as NumPy.

  Bisect only: on one device every method gives the same masks (the main
  suite checks that against the NumPy reference).
  """
  tx = make_tx(scope, "bisect")
  params = jax.device_put(host_params(), jax.devices()[0])
  opt_state = tx.init(params)
  step = jax.jit(train_step(tx))
  out = []
  for _ in range(STEPS):
    params, opt_state = step(params, opt_state)
    masks = {n: np.asarray(m) for n, m in mask_leaves(opt_state).items()}
    out.append((masks, {n: np.asarray(x) for n, x in params.items()}))
  return out


def sharding_problems(tree, shardings: dict, mesh, *, init: bool = False) -> list[str]:
  """Leaves of ``tree`` (params, opt state) not placed like their params.

  Leaves under a param's name with its shape (masks, Adam moments) must have
  its sharding. Scalars (counts, target sparsities) must be replicated over
  the mesh; right after an eager ``init`` they may also sit on one device, as
  optax's own counts do.
  """
  problems = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path)
    names = [n for n in LEAVES if f"'{n}'" in key and leaf.shape == LEAVES[n][0]]
    want = shardings[names[0]] if names else NamedSharding(mesh, P())
    if leaf.sharding.is_equivalent_to(want, leaf.ndim):
      continue
    if init and not names and len(leaf.sharding.device_set) == 1:
      continue
    problems.append(f"{key}: {leaf.sharding} instead of {want}")
  return problems


def replicate_scalars(tree, mesh):
  """Puts the 0-d leaves of an eager ``init`` (optax's counts, ours) and our
  per-leaf vectors on the mesh, replicated.

  Otherwise the first step's replicated outputs differ from its inputs and the
  step compiles twice, whatever the masks do.
  """
  replicated = NamedSharding(mesh, P())
  put = lambda x: jax.device_put(x, replicated)
  tree = jax.tree.map(lambda x: put(x) if x.ndim == 0 else x, tree)
  is_pruning = lambda x: isinstance(x, optax_prune.MagnitudePruningState)
  return jax.tree.map(
      lambda x: x._replace(target_sparsity=put(x.target_sparsity),
                           pruned_units=put(x.pruned_units)) if is_pruning(x) else x,
      tree, is_leaf=is_pruning)


class CompileCounter:
  """Counts XLA compilations, through `jax.monitoring`."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    self.count += event == self.EVENT


class Results:
  """Named pass/fail results and free-form facts, written as JSON."""

  def __init__(self):
    self.checks: dict[str, dict] = {}
    self.info: dict[str, object] = {}

  def record(self, name: str, problems: list[str]):
    ok = not problems
    detail = "; ".join(dict.fromkeys(problems))  # Unique, in order.
    self.checks[name] = {"ok": ok, "detail": detail}
    print(f"{'PASS' if ok else 'FAIL'} {name}" + ("" if ok else f": {detail}"), flush=True)

  def record_error(self, names: list[str]):
    detail = traceback.format_exc(limit=-4)
    for name in names:
      self.checks[name] = {"ok": False, "detail": detail}
    print(f"ERROR {', '.join(names)}:\n{detail}", flush=True)


def placed(mesh) -> tuple[dict, dict]:
  shardings = {n: NamedSharding(mesh, spec) for n, (_, spec) in LEAVES.items()}
  params = {n: jax.device_put(x, shardings[n]) for n, x in host_params().items()}
  return params, shardings


def check_init(results: Results, axes: str):
  name = f"init-shardings-{axes}"
  try:
    mesh = make_mesh(axes)
    with mesh_context(mesh, axes):
      params, shardings = placed(mesh)
      tx = make_tx("layer", "bisect")
      problems = sharding_problems(tx.init(params), shardings, mesh, init=True)
      # Concrete leaves: replicated ones are known whole ("auto" may sort
      # them), split ones are not.
      problems += [
          f"known_whole({n}) is {not x.sharding.is_fully_replicated} on a"
          f" {'replicated' if x.sharding.is_fully_replicated else 'split'} leaf"
          for n, x in params.items()
          if _placement.known_whole(x) != x.sharding.is_fully_replicated]
      jitted = jax.jit(tx.init)(params)
      jit_problems = sharding_problems(jitted, shardings, mesh, init=True)
      if axes == "explicit":  # Shardings are in the types: jit keeps them.
        problems += [f"jit: {p}" for p in jit_problems]
        # A state placed otherwise than its params (nnx.Optimizer places it
        # by the Variables' metadata): the step reads its masks placed like
        # the params, and masks the updates as the well-placed state does.
        prune = optax_prune.magnitude_pruning(
            SCHEDULE, threshold="bisect", distribution="uniform", layer_axis=LAYER_AXIS)
        state = prune.init(params)
        elsewhere = state._replace(masks=jax.tree.map(
            lambda m: jax.sharding.reshard(m, P()), state.masks))
        try:
          moved = jax.jit(prune.update)(params, elsewhere, params)
          placed_state = jax.jit(prune.update)(params, state, params)
          if not all(jax.tree.leaves(jax.tree.map(
              lambda a, b: bool(jnp.array_equal(a, b)), moved, placed_state))):
            problems.append("masks placed otherwise than the params change the step")
        except Exception as e:  # pylint: disable=broad-except
          problems.append(f"masks placed otherwise than the params: {type(e).__name__}: {e}"[:300])
      else:  # Under Auto axes, as for any optax state, jit needs out_shardings.
        results.info["jit-init-auto"] = jit_problems
    results.record(name, problems)
  except Exception:  # pylint: disable=broad-except
    results.record_error([name])


def check_config(
    results: Results, config: str, one_device: list[tuple[dict, dict]],
    compiles: CompileCounter,
):
  axes, scope, method = config.split("-")
  names = [f"masks-{config}"]
  names += [f"shardings-{config}"] if _placement_checked(config) else []
  names += [f"no-gather-{config}"] if method != "sort" else []
  try:
    mesh = make_mesh(axes)
    tx = make_tx(scope, method)
    with mesh_context(mesh, axes):
      params, shardings = placed(mesh)
      opt_state = replicate_scalars(tx.init(params), mesh)
      step = jax.jit(train_step(tx))
      compiled = step.lower(params, opt_state).compile()  # Cached for the calls.
      recompiles = 0
      ops = collectives(compiled.as_text())
      results.info[f"collectives-{config}"] = sorted(set(ops))
      results.info[f"temp-bytes-{config}"] = compiled.memory_analysis().temp_size_in_bytes
      mask_problems, placement_problems = [], []
      for t in range(STEPS):
        before = {n: np.asarray(x) for n, x in params.items()}
        before_count = compiles.count
        params, opt_state = step(params, opt_state)
        recompiles += compiles.count - before_count
        masks = {n: np.asarray(m) for n, m in mask_leaves(opt_state).items()}
        want = reference_masks(before, scope, SCHEDULE(t).sparsity)
        one_masks, one_params = one_device[t]
        for n in want:
          if not np.array_equal(masks[n], want[n]):
            mask_problems.append(f"step {t} {n}: differs from the NumPy reference")
          if not np.array_equal(masks[n], one_masks[n]):
            mask_problems.append(f"step {t} {n}: differs from one device")
        for n, x in params.items():
          if not np.array_equal(np.asarray(x), one_params[n]):
            mask_problems.append(f"step {t} params {n}: differ from one device")
        placement_problems += sharding_problems((params, opt_state), shardings, mesh)
      if recompiles:
        placement_problems.append(
            f"the step compiled {recompiles} more times: the state changed"
            " sharding between steps")
    results.record(f"masks-{config}", mask_problems)
    if _placement_checked(config):
      results.record(f"shardings-{config}", placement_problems)
    else:
      results.info[f"placement-{config}"] = sorted(set(placement_problems))
    if method != "sort":
      # Only counts may cross devices: all-reduces of a few integers (bisect),
      # or of the histograms' uint32 counts, whatever the size of the leaves.
      results.record(f"no-gather-{config}", [
          f"{op} {ty}" for op, ty in ops if not _only_counts(op, ty, method)])
  except Exception:  # pylint: disable=broad-except
    results.record_error(names)


def make_structured_tx(name: str):
  granularity, score = STRUCTURED[name]
  return optax.chain(optax.adam(0.1), optax_prune.magnitude_pruning(
      SCHEDULE, granularity=optax_prune.by_path({"small_whole": None}, granularity),
      score=score, threshold="bisect", layer_axis=LAYER_AXIS))


def check_structured(results: Results, axes: str, name: str):
  """Structured masks of a sharded run equal those of one device, bitwise."""
  check = f"structured-{axes}-{name}"
  try:
    tx = make_structured_tx(name)
    runs = []
    for sharded in (False, True):
      mesh = make_mesh(axes)
      with mesh_context(mesh, axes) if sharded else contextlib.nullcontext():
        if sharded:
          params, _ = placed(mesh)
          opt_state = replicate_scalars(tx.init(params), mesh)
        else:
          params = jax.device_put(host_params(), jax.devices()[0])
          opt_state = tx.init(params)
        step = jax.jit(train_step(tx))
        masks = []
        for _ in range(STEPS):
          params, opt_state = step(params, opt_state)
          masks.append({n: np.asarray(m) for n, m in mask_leaves(opt_state).items()})
        runs.append(masks)
    problems = [
        f"step {t} {n}: differs from one device"
        for t, (one, split) in enumerate(zip(*runs)) for n in one
        if not np.array_equal(one[n], split[n])
    ]
    problems += [f"step {STEPS - 1} {n}: nothing pruned" for n, m in runs[0][-1].items()
                 if m.all()]
    results.record(check, problems)
  except Exception:  # pylint: disable=broad-except
    results.record_error([check])


# Sparse training ranks drop and grow (RigL) or dense weights (STE) with the
# same gather-free kernels: masks update at steps 1 and 2.
SPARSE_TRAINING = {
    "rigl": lambda: optax_prune.rigl(optax.adam(0.1), 0.75, end_step=3, frequency=1,
                                     threshold="histogram", layer_axis=LAYER_AXIS),
    "ste": lambda: optax.chain(optax.adam(0.1), optax_prune.straight_through(
        SCHEDULE, threshold="histogram", distribution="uniform", layer_axis=LAYER_AXIS)),
}


def check_sparse_training(results: Results, axes: str, method: str):
  """Masks and params of a sharded run equal those of one device, bitwise, and
  the compiled step moves only counts across devices."""
  names = [f"sparse-training-{method}-{axes}", f"no-gather-{method}-{axes}"]
  try:
    tx = SPARSE_TRAINING[method]()
    runs, ops = [], []
    for sharded in (False, True):
      mesh = make_mesh(axes)
      with mesh_context(mesh, axes) if sharded else contextlib.nullcontext():
        if sharded:
          params, _ = placed(mesh)
          opt_state = replicate_scalars(tx.init(params), mesh)
        else:
          params = jax.device_put(host_params(), jax.devices()[0])
          opt_state = tx.init(params)
        step = jax.jit(train_step(tx))
        if sharded:
          ops = collectives(step.lower(params, opt_state).compile().as_text())
        run = []
        for _ in range(STEPS):
          params, opt_state = step(params, opt_state)
          run.append(({n: np.asarray(m) for n, m in mask_leaves(opt_state).items()},
                      {n: np.asarray(x) for n, x in params.items()}))
        runs.append(run)
    problems = [
        f"step {t} {kind} {n}: differs from one device"
        for t, (one, split) in enumerate(zip(*runs))
        for kind, a, b in (("masks", one[0], split[0]), ("params", one[1], split[1]))
        for n in a if not np.array_equal(a[n], b[n])
    ]
    first, last = runs[0][0][0], runs[0][-1][0]
    problems += [f"{n}: the masks never changed" for n in first
                 if np.array_equal(first[n], last[n]) and n != "small_whole"]
    results.record(names[0], problems)
    results.record(names[1], [f"{op} {ty}" for op, ty in ops
                              if not _only_counts(op, ty, "histogram")])
  except Exception:  # pylint: disable=broad-except
    results.record_error(names)


def check_packed(results: Results, axes: str, one_device: list[tuple[dict, dict]],
                 compiles: CompileCounter):
  """Packed masks: bits placed with their param's spec, masks and params equal
  to the one-device bool run, only counts crossing devices, one compile."""
  name = f"packed-masks-{axes}"
  try:
    mesh = make_mesh(axes)
    tx = make_tx("layer", "bisect", packed=True)
    with mesh_context(mesh, axes):
      params, shardings = placed(mesh)
      opt_state = replicate_scalars(tx.init(params), mesh)
      step = jax.jit(train_step(tx))
      compiled = step.lower(params, opt_state).compile()
      problems = [f"{op} {ty}" for op, ty in collectives(compiled.as_text())
                  if not _only_counts(op, ty, "bisect")]
      recompiles = 0
      for t in range(STEPS):
        before_count = compiles.count
        params, opt_state = step(params, opt_state)
        recompiles += compiles.count - before_count
        packed = mask_leaves(opt_state)
        masks = optax_prune.unpack_masks(packed, {n: params[n] for n in packed})
        one_masks, one_params = one_device[t]
        for n, bits in packed.items():
          if bits.dtype != jnp.uint8:
            problems.append(f"{n}: masks stored as {bits.dtype}, not uint8 bits")
          if not bits.sharding.is_equivalent_to(shardings[n], bits.ndim):
            problems.append(f"step {t} {n}: bits placed {bits.sharding}, not {shardings[n]}")
          if not np.array_equal(np.asarray(masks[n]), one_masks[n]):
            problems.append(f"step {t} {n}: differs from one device")
        for n, x in params.items():
          if not np.array_equal(np.asarray(x), one_params[n]):
            problems.append(f"step {t} params {n}: differ from one device")
      if recompiles:
        problems.append(f"the step compiled {recompiles} more times")
    results.record(name, problems)
  except Exception:  # pylint: disable=broad-except
    results.record_error([name])


def check_prune(results: Results, axes: str):
  """One-shot `prune` on placed params: masks and pruned params equal to one
  device and to NumPy, masks placed like their params."""
  name = f"prune-one-shot-{axes}"
  try:
    sparsity = 0.6
    one = jax.device_put(host_params(), jax.devices()[0])
    one_pruned, one_masks = optax_prune.prune(one, sparsity, threshold="bisect",
                                              distribution="uniform", layer_axis=LAYER_AXIS)
    mesh = make_mesh(axes)
    with mesh_context(mesh, axes):
      params, shardings = placed(mesh)
      pruned, masks = optax_prune.prune(params, sparsity, threshold="bisect",
                                        distribution="uniform", layer_axis=LAYER_AXIS)
    want = reference_masks(host_params(), "layer", sparsity)
    problems = []
    for n, m in masks.items():
      if isinstance(m, optax.MaskedNode):
        continue
      if not np.array_equal(np.asarray(m), want[n]):
        problems.append(f"{n}: differs from the NumPy reference")
      if not np.array_equal(np.asarray(m), np.asarray(one_masks[n])):
        problems.append(f"{n}: differs from one device")
      if not m.sharding.is_equivalent_to(shardings[n], m.ndim):
        problems.append(f"{n}: mask placed {m.sharding}, not {shardings[n]}")
    for n, x in pruned.items():
      if not np.array_equal(np.asarray(x), np.asarray(one_pruned[n])):
        problems.append(f"params {n}: differ from one device")
    results.record(name, problems)
  except Exception:  # pylint: disable=broad-except
    results.record_error([name])


# SparseGPT on a kernel split along its outputs: (compare, N:M, sparsity).
SPARSEGPT = {"block": ("block", None, 0.5), "leaf": ("leaf", None, 0.37),
             "output": ("output", None, 0.5), "2of4": ("block", (2, 4), 1.0)}
SPARSEGPT_SPECS = {"model": P(None, "model"), "all": P(None, ("data", "model"))}


def sparsegpt_configs(axes: str) -> list[str]:
  """Under Auto axes only the masks chosen across devices (the check takes
  about 40 s in all; every configuration runs with Explicit axes)."""
  return [c for c in SPARSEGPT if axes == "explicit" or c in ("block", "leaf")]


def check_sparsegpt(results: Results, axes: str):
  """`sparsegpt` on a (40, 256) kernel split along its outputs over 4 and 8
  devices: masks and weights equal to one device bit for bit, the result
  placed like the kernel, and only counts cross devices (the block and leaf
  masks are chosen from summed counts and per-row tie counts)."""
  from optax_prune import _sparsegpt  # pylint: disable=import-outside-toplevel

  names = [f"sparsegpt-{c}-{axes}" for c in sparsegpt_configs(axes)]
  try:
    rng = np.random.default_rng(0)
    w = np.round(rng.standard_normal((40, 256)).astype(np.float32) * 2) / 2  # Ties.
    x = rng.standard_normal((96, 40)).astype(np.float32)
    x[:, 5] = 0.0  # An unseen input.
    hessians = {"['kernel']": optax_prune.Hessian(x.T @ x, (1,))}
    mesh = make_mesh(axes)
    for name, config in zip(names, sparsegpt_configs(axes)):
      compare, nm, sparsity = SPARSEGPT[config]
      granularity = None if nm is None else optax_prune.n_of_m(*nm, axis=0)
      run = lambda p: optax_prune.sparsegpt(p, hessians, sparsity, compare=compare,
                                            granularity=granularity, blocksize=16)
      one_w, one_m = run({"kernel": jax.device_put(w, jax.devices()[0])})
      problems = []
      # Both placements for the block masks, all 8 devices for the others.
      specs = SPARSEGPT_SPECS if config == "block" else {"all": SPARSEGPT_SPECS["all"]}
      for label, spec in specs.items():
        with mesh_context(mesh, axes):
          placed_w = jax.device_put(w, NamedSharding(mesh, spec))
          got_w, got_m = run({"kernel": placed_w})
          hits = _sparsegpt.sharded_sweep.cache_info().hits
          sweep = _sparsegpt.sharded_sweep(mesh, spec[1], compare=compare, nm=nm, blocksize=16)
          if _sparsegpt.sharded_sweep.cache_info().hits != hits + 1:
            problems.append(f"{label}: sparsegpt did not sweep shard by shard")
          counts = jnp.zeros(3 if compare == "block" else 1, jnp.int32)
          hlo = sweep.lower(placed_w, jnp.asarray(x.T @ x), counts,
                            jnp.float32(0.01)).compile().as_text()
        if not np.array_equal(np.asarray(got_m["kernel"]), np.asarray(one_m["kernel"])):
          problems.append(f"{label}: masks differ from one device")
        if not np.array_equal(np.asarray(got_w["kernel"]), np.asarray(one_w["kernel"])):
          problems.append(f"{label}: weights differ from one device")
        for leaf in (got_w["kernel"], got_m["kernel"]):
          if not leaf.sharding.is_equivalent_to(placed_w.sharding, 2):
            problems.append(f"{label}: result placed {leaf.sharding}, not {placed_w.sharding}")
        # Counts only: at most the per-row tie counts of 8 devices over the 48
        # padded rows ("leaf"); the kernel's shards hold 40 x 32 or 40 x 64.
        moved = [(op, t) for op, t in collectives(hlo)
                 if not (re.fullmatch(r"\(?(s32|u32)\[[0-9,]*\](\{[0-9,]*\})?\)?", t.strip())
                         and elements(t) <= 8 * 48)]
        if moved:
          problems.append(f"{label}: moves more than counts: {moved[:3]}")
        if (compare == "output" or nm is not None) and collectives(hlo):
          problems.append(f"{label}: columns are independent, yet {collectives(hlo)[:3]}")
      results.record(name, problems)
  except Exception:  # pylint: disable=broad-except
    results.record_error(names)


def check_memory(results: Results):
  """Per-device temporaries of a bisect update shrink with the shard."""
  from benchmarks import sharded_memory  # pylint: disable=import-outside-toplevel

  name = "memory-bisect-global"
  try:
    placements = ["one device", "fsdp 8", "2d 2x4"]
    records = sharded_memory.run(3e4, ["bisect"], ["global"], placements)
    results.info[name] = records
    whole = records[0]["temp_bytes"]
    problems = [
        f"{r['placement']}: {r['temp_bytes']} temp bytes per device, one"
        f" device {whole}; {r['all_gathers']} all-gathers"
        for r in records[1:]
        # 8 shards: at most a quarter of the unsharded temporaries, no gather.
        if r["temp_bytes"] > whole / 4 or r["all_gathers"]
    ]
    results.record(name, problems)
  except Exception:  # pylint: disable=broad-except
    results.record_error([name])


def run_mesh_checks(out_path: str):
  if jax.device_count() != 8:
    raise SystemExit(
        f"expected 8 devices, got {jax.device_count()}: set"
        " XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting."
    )
  start = time.perf_counter()
  results = Results()
  compiles = CompileCounter()
  for axes in AXES:
    check_init(results, axes)
  check_memory(results)
  one_device = {scope: run_one_device(scope) for scope in SCOPES}
  for config in config_names():
    check_config(results, config, one_device[config.split("-")[1]], compiles)
  for name in STRUCTURED:
    check_structured(results, "explicit", name)
  for axes in AXES:
    check_packed(results, axes, one_device["layer"], compiles)
    check_prune(results, axes)
    check_sparsegpt(results, axes)
    for method in SPARSE_TRAINING:
      check_sparse_training(results, axes, method)
  results.info["seconds"] = round(time.perf_counter() - start, 1)
  with open(out_path, "w") as f:
    json.dump({"checks": results.checks, "info": results.info}, f, indent=1)
  print(f"mesh checks done in {results.info['seconds']} s", flush=True)


# Multi-process: a small MLP, its hidden layer split over the 4 devices of 2
# processes (2 each), trained against fixed data.
MLP_SPECS = {
    "w1": P(None, "fsdp"), "b1": P(), "w2": P("fsdp", None), "b2": P(),
}
MLP_STEPS = 6
MLP_SCHEDULE = optax_prune.polynomial_schedule(
    0.8, begin_step=0, end_step=4, frequency=1
)


def mlp_host(seed: int = 0):
  rng = np.random.default_rng(seed)
  f32 = lambda x: np.asarray(x, np.float32)
  params = {
      "w1": f32(rng.standard_normal((16, 64)) / 4), "b1": f32(np.zeros(64)),
      "w2": f32(rng.standard_normal((64, 8)) / 8), "b2": f32(np.zeros(8)),
  }
  data = (f32(rng.standard_normal((32, 16))), f32(rng.standard_normal((32, 8))))
  return params, data


def mlp_train(params, data):
  """Returns the params and masks after ``MLP_STEPS`` steps."""
  tx = optax.chain(
      optax.adam(1e-2), optax_prune.magnitude_pruning(MLP_SCHEDULE, threshold="auto")
  )

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      x, y = data
      out = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
      return jnp.mean((out - y) ** 2)

    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(MLP_STEPS):
    params, opt_state = step(params, opt_state)
  return params, mask_leaves(opt_state)


def run_worker(process_id: int, port: int, out_dir: str):
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2,
        process_id=process_id, initialization_timeout=60,
        heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30,
    )
    jax.devices()  # Starts the CPU backend with its cross-process collectives.
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not re.search(r"gloo|collective", f"{type(e).__name__} {e}", re.I):
      raise  # Another failure (a port taken, a timeout) is not a skip.
    print(f"SKIP: no CPU collectives across processes in JAX {jax.__version__}:"
          f" {message}", flush=True)
    raise SystemExit(SKIP_EXIT_CODE)
  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  host, data = mlp_host()
  mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(AxisType.Auto,))
  shardings = {n: NamedSharding(mesh, s) for n, s in MLP_SPECS.items()}
  params = {
      n: jax.make_array_from_callback(x.shape, shardings[n], lambda i, x=x: x[i])
      for n, x in host.items()
  }
  replicated = NamedSharding(mesh, P())
  global_data = tuple(
      jax.make_array_from_callback(d.shape, replicated, lambda i, d=d: d[i])
      for d in data
  )
  params, masks = mlp_train(params, global_data)
  placement = [
      f"{n}: {m.sharding}" for n, m in masks.items()
      if not m.sharding.is_equivalent_to(shardings[n], m.ndim)
  ]
  gathered = multihost_utils.process_allgather((params, masks), tiled=True)

  # The same run on this process's first device alone.
  local = jax.local_devices()[0]
  one_params, one_masks = mlp_train(
      jax.device_put(host, local), jax.device_put(data, local)
  )
  out = {f"sharded/masks/{n}": np.asarray(m) for n, m in gathered[1].items()}
  out.update({f"sharded/params/{n}": np.asarray(x) for n, x in gathered[0].items()})
  out.update({f"single/masks/{n}": np.asarray(m) for n, m in one_masks.items()})
  out.update({f"single/params/{n}": np.asarray(x) for n, x in one_params.items()})
  np.savez(os.path.join(out_dir, f"process{process_id}.npz"), **out)
  with open(os.path.join(out_dir, f"process{process_id}.json"), "w") as f:
    json.dump({"placement_problems": placement}, f)
  jax.distributed.shutdown()
  print(f"process {process_id} done", flush=True)


def main(argv):
  if argv[:1] == ["mesh"] and len(argv) == 2:
    run_mesh_checks(argv[1])
  elif argv[:1] == ["worker"] and len(argv) == 4:
    run_worker(int(argv[1]), int(argv[2]), argv[3])
  else:
    raise SystemExit(__doc__)


if __name__ == "__main__":
  main(sys.argv[1:])
