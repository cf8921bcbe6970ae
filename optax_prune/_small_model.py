"""The shrunk model as a callable: the traced model evaluated at its new widths.

:func:`channel_groups` traces the model to a jaxpr and follows every axis; it
keeps the walk (nested calls inlined). :func:`build` evaluates that walk with
each primitive bound again, its shape-carrying parameters rewritten from the
analysis: an axis of a shrunk group takes the group's kept count, a
flattened axis (or one split into heads) ``outer * kept * inner``;
broadcast, reshape and iota shapes, ``slice`` limits (and the place of an
equal piece: a third of a fused q/k/v projection), ``split`` sizes,
``dynamic_slice`` / ``gather`` slice sizes, the feature groups of a
depthwise convolution and random-number shapes follow. Params,
state and inputs are arguments: the callable is jittable, differentiable
where the model is, and exports with ``jax.export``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

# Primitives whose `shape` parameter is their output's shape.
_SHAPED = frozenset({"broadcast_in_dim", "iota", "random_bits", "rng_bit_generator",
                     "rng_uniform", "full"})


def build(trace: Any, new_sizes: dict[int, int]) -> Callable:
  """``apply(params, [state,] *inputs)`` of the model with the axes of the
  union-find roots in ``new_sizes`` at their new lengths."""
  graph = trace.graph

  def size(var, axis: int) -> int:
    node = graph.ids.get((var, axis))
    old = int(var.aval.shape[axis])
    return old if node is None else new_sizes.get(graph.find(node), old)

  def shape(var) -> tuple[int, ...]:
    if isinstance(var, jcore.Literal):
      return tuple(np.shape(var.val))
    return tuple(size(var, a) for a in range(len(getattr(var.aval, "shape", ()))))

  def params_of(eqn) -> dict:
    params = dict(eqn.params)
    name = eqn.primitive.name
    outs = [shape(v) for v in eqn.outvars]
    if all(o == tuple(v.aval.shape) for o, v in zip(outs, eqn.outvars)) and all(
        shape(v) == tuple(getattr(v.aval, "shape", ())) for v in eqn.invars):
      return params
    if name == "reshape":
      params["new_sizes"], params["dimensions"] = outs[0], None
    elif name in _SHAPED and "shape" in params:
      params["shape"] = outs[0]
    elif name in ("gather", "dynamic_slice"):
      x = eqn.invars[0]
      params["slice_sizes"] = tuple(
          size(x, a) if n == x.aval.shape[a] else n for a, n in enumerate(params["slice_sizes"]))
    elif name == "slice":
      (x,), (y,) = eqn.invars, eqn.outvars
      starts, limits = [], []
      for a, (start, stop) in enumerate(zip(params["start_indices"], params["limit_indices"])):
        if (start, stop) == (0, x.aval.shape[a]):  # The whole axis.
          start, stop = 0, size(x, a)
        elif size(y, a) != y.aval.shape[a]:  # A piece (a third of a fused q/k/v): its new place.
          start = start // y.aval.shape[a] * size(y, a)
          stop = start + size(y, a)
        starts.append(start)
        limits.append(stop)
      params["start_indices"], params["limit_indices"] = tuple(starts), tuple(limits)
    elif name == "split":
      params["sizes"] = tuple(o[params["axis"]] for o in outs)
    elif name == "conv_general_dilated" and params["feature_group_count"] > 1:
      lhs_spec = params["dimension_numbers"][0]
      params["feature_group_count"] = size(eqn.invars[0], lhs_spec[1])  # Depthwise.
    return params

  def run(*flat):
    env: dict = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    for var, x in zip(trace.invars, flat):
      env[var] = x
    for step in graph.program:
      if step[0] == "const":
        env[step[1]] = step[2]
      elif step[0] == "alias":
        env[step[1]] = read(step[2])
      else:
        eqn = step[1]
        bind_params = eqn.primitive.get_bind_params(params_of(eqn))
        # Older JAX returns (subfuns, params).
        subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
        out = eqn.primitive.bind(*subfuns, *[read(v) for v in eqn.invars], **bind_params)
        for var, x in zip(eqn.outvars, out if eqn.primitive.multiple_results else [out]):
          env[var] = x
    return [read(v) for v in trace.outvars]

  def apply(*args):
    trees = len(trace.tree_defs)
    flat = []
    for name, tree, treedef in zip(("params", "state"), args[:trees], trace.tree_defs):
      leaves, got = jax.tree.flatten(tree)
      if got != treedef:
        raise ValueError(
            f"`{name}` has another structure than the one `channel_groups` traced:"
            " pass the shrunk params (and state) of `shrink`.")
      flat += leaves
    inputs, input_def = jax.tree.flatten(args[trees:])
    if input_def != trace.input_def:
      raise ValueError(
          "the inputs have another structure than the example inputs given to"
          f" `channel_groups` ({trace.input_def}).")
    flat += [jnp.asarray(x) for x in inputs]
    for i, (var, x) in enumerate(zip(trace.invars[:len(flat) - len(inputs)], flat)):
      if tuple(jnp.shape(x)) != shape(var):
        raise ValueError(
            f"leaf {i} of the params (and state) has shape {tuple(jnp.shape(x))}; the"
            f" shrunk model takes {shape(var)}: pass `shrink(...).params` (and `.state`).")
    return trace.out_def.unflatten(run(*flat))

  return apply


class Mismatch(ValueError):
  """The shrunk model does not compute the masked model's outputs."""


def check(trace: Any, apply: Callable, params: Any, state: Any, small_params: Any,
          small_state: Any) -> float:
  """The largest difference between the shrunk model and the masked model on
  the example inputs; a ``ValueError`` when over ``1e-5 * max|output|`` (rtol 1e-5)."""
  inputs = trace.inputs
  if not all(isinstance(x, (np.ndarray, jax.Array, np.generic, int, float))
             for x in jax.tree.leaves(inputs)):
    return float("nan")  # Shapes only: nothing to run.
  trees = (params, state) if trace.has_state else (params,)
  smalls = (small_params, small_state) if trace.has_state else (small_params,)
  want = jax.tree.leaves(jax.jit(trace.fn)(*trees, *inputs))  # One compile, not one per op.
  got = jax.tree.leaves(jax.jit(apply)(*smalls, *inputs))
  worst = 0.0
  for w, g in zip(want, got):
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    if w.shape != g.shape:
      raise Mismatch(f"the shrunk model gives an output of shape {g.shape}, the masked"
                       f" model {w.shape}: a width is computed in Python from a shape.")
    scale = float(np.max(np.abs(w), initial=0.0))
    diff = np.abs(g - w)
    worst = max(worst, float(np.max(diff, initial=0.0)))
    if np.any(diff > 1e-5 * scale + 1e-5 * np.abs(w)):
      raise Mismatch(
          f"the shrunk model's outputs differ from the masked model's by up to"
          f" {float(np.max(diff)):.3g} (largest output {scale:.3g}): the model computes"
          " something from a width that its jaxpr does not show (a constant from"
          " `x.shape`, say). Use the shrunk params with a model built at the new widths.")
  return worst
