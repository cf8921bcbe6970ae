"""Input-feature norms of every weight, read off the model's jaxpr.

Activation-aware scores (Wanda, Sun et al. 2023) weigh ``|w_ij|`` by the L2
norm of input feature ``j`` over calibration data. No hook in the model is
needed: the model is traced once, and while its jaxpr is evaluated on the
calibration batches, the operand that meets a parameter in a
``dot_general`` or ``conv_general_dilated`` is recorded. Works for any JAX
model (flax linen, nnx, plain functions), whatever activation comes before.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

# Primitives that call a sub-jaxpr, and the parameter that holds it: their
# bodies are walked, so weights inside (jitted helpers, remat) are seen.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
          "remat": "jaxpr", "checkpoint": "jaxpr"}
# Ops after which a value is still the parameter itself (a dtype cast).
_SAME_VALUE = {"convert_element_type", "copy", "copy_p"}


class InputNorm(NamedTuple):
  """The input-feature norms of one weight leaf.

  ``norm`` broadcasts against the leaf: the L2 norm of each input feature
  over every calibration example and position along the contracting axes
  (the input axis of a ``Dense`` kernel, the input-channel axis of a
  ``Conv`` kernel), 1-sized elsewhere. ``output_axes``: the leaf's axes that
  index output features (Wanda compares weights within each output).
  """

  norm: Any
  output_axes: tuple[int, ...]


def input_norms(fn: Callable[..., Any], params: Any, batches: Iterable[Any]) -> dict[str, InputNorm]:
  r"""Input-feature norms of each weight of ``fn``, over calibration ``batches``.

  .. math::

    \lVert x_j \rVert_2 = \Big(\sum_{\text{batches}} \sum_{b, t} x_{b t j}^2\Big)^{1/2}

  for the operand :math:`x` that meets a leaf of ``params`` in a matrix
  multiplication (``dot_general``, contracting axes :math:`j`) or a
  convolution (input channels :math:`j`; summed over batch and space). A leaf
  used several times accumulates all its inputs.

  Args:
    fn: ``fn(params, batch)``, the model's forward pass (e.g. ``lambda p, x:
      model.apply({"params": p}, x)``, or ``nnx.merge`` inside).
    params: the trained params.
    batches: calibration inputs, each passed as ``batch``.

  Returns:
    ``{keystr(path): InputNorm}`` for every leaf used as a weight; leaves not
    found (embeddings read by a gather, biases) are absent.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> params = {"w": jnp.ones((3, 2))}
    >>> x = jnp.array([[3.0, 0.0, 1.0], [4.0, 0.0, 1.0]])
    >>> norms = optax_prune.input_norms(lambda p, x: jnp.tanh(x) @ p["w"], params, [x])
    >>> norms["['w']"].output_axes, norms["['w']"].norm.shape
    ((1,), (3, 1))
  """
  path_leaves, leaves, found, totals, _ = _collect(fn, params, batches, _NORMS)
  out = {}
  for i, total in totals.items():
    contracting, outputs = found[i]
    shape = [1] * np.ndim(leaves[i])
    for axis, size in zip(contracting, np.shape(total)):
      shape[axis] = size
    out[jax.tree_util.keystr(path_leaves[i][0])] = InputNorm(
        np.sqrt(total).astype(np.float32).reshape(shape), outputs)
  return out


class _Statistic(NamedTuple):
  """What is recorded of the operand ``x`` that meets a weight.

  ``dot(x, k)``: ``x`` with its contracting axes last, in the order of the
  weight's input axes, ``k`` of them; ``conv`` the same for a convolution's
  input (channels last), or None to record nothing there.
  """

  dot: Callable[[jax.Array, int], jax.Array]
  conv: Optional[Callable[[jax.Array, int], jax.Array]]


def _sum_squares(x: jax.Array, k: int) -> jax.Array:
  x = x.astype(jnp.float32)
  return jnp.sum(x * x, axis=tuple(range(x.ndim - k)))


_NORMS = _Statistic(_sum_squares, _sum_squares)


# Jitted statistic sums by (fn, params structure, statistic), as `jax.jit`
# caches by function: the blocks of a sequential walk that share a forward
# function and shapes compile once, not once per block and call.
_SUMS: "collections.OrderedDict[Any, tuple]" = collections.OrderedDict()
_SUMS_MAX = 16


def _compiled_sums(fn: Callable[..., Any], treedef: Any, statistic: "_Statistic") -> tuple:
  """``(run, found)``: ``run(leaves, batch)`` sums ``statistic`` of each
  weight's input; ``found[i]``, filled when ``run`` is traced, holds leaf
  ``i``'s (contracting axes, output axes)."""
  key = (fn, treedef, statistic)
  try:
    hash(key)
  except TypeError:  # An unhashable callable: no sharing.
    key = None
  if key is not None and key in _SUMS:
    _SUMS.move_to_end(key)
    return _SUMS[key]
  found: dict[int, tuple] = {}  # Leaf index -> (contracting axes, output axes).

  def sums(flat, batch):
    closed = jax.make_jaxpr(lambda f, b: fn(treedef.unflatten(f), b))(flat, batch)
    owner = {v: i for i, v in enumerate(closed.jaxpr.invars[:len(flat)])}
    totals: dict[int, jax.Array] = {}
    _walk(closed.jaxpr, closed.consts, [*flat, *jax.tree.leaves(batch)], owner, totals, found,
          statistic)
    return totals

  entry = (jax.jit(sums), found)
  if key is not None:
    _SUMS[key] = entry
    while len(_SUMS) > _SUMS_MAX:
      _SUMS.popitem(last=False)
  return entry


def _collect(fn: Callable[..., Any], params: Any, batches: Iterable[Any],
             statistic: _Statistic) -> tuple:
  """Evaluates ``fn``'s jaxpr on each batch, summing ``statistic`` of each
  weight's input over the batches (float64 on the host).

  Returns ``(path_leaves, leaves, found, totals, dtypes)``: ``found[i]`` the
  (input axes, output axes) of leaf ``i``, ``totals[i]`` its summed
  statistic, ``dtypes[i]`` the dtype the device computed it in.
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [x for _, x in path_leaves]
  run, found = _compiled_sums(fn, treedef, statistic)
  totals: dict[int, np.ndarray] = {}
  dtypes: dict[int, Any] = {}
  for batch in batches:
    for i, value in run(leaves, batch).items():
      totals[i] = totals.get(i, 0.0) + np.asarray(value, np.float64)
      dtypes[i] = value.dtype
  return path_leaves, leaves, found, totals, dtypes


def _walk(jaxpr, consts, args, owner, totals, found, statistic) -> list:
  env = {}
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    owners = [None if isinstance(v, jax_core.Literal) else owner.get(v) for v in eqn.invars]
    name = eqn.primitive.name
    sub = eqn.params.get(_CALLS.get(name, ""))
    if sub is not None:
      body, body_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, ())
      inner = {v: o for v, o in zip(body.invars, owners) if o is not None}
      outs = _walk(body, body_consts, invals, inner, totals, found, statistic)
    else:
      if name == "dot_general":
        _record_dot(eqn, invals, owners, totals, found, statistic)
      elif name == "conv_general_dilated":
        _record_conv(eqn, invals, owners, totals, found, statistic)
      bound = eqn.primitive.get_bind_params(eqn.params)
      # (subfuns, params) before JAX 0.8, params alone since.
      subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
      outs = eqn.primitive.bind(*subfuns, *invals, **params)
      outs = outs if eqn.primitive.multiple_results else [outs]
      if name in _SAME_VALUE and owners[0] is not None:
        owner[eqn.outvars[0]] = owners[0]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _add(totals, found, i, total, contracting, outputs):
  if i in found and found[i] != (contracting, outputs):
    return  # Used again in another layout: keep the first.
  found[i] = (contracting, outputs)
  totals[i] = totals[i] + total if i in totals else total


def _record_dot(eqn, invals, owners, totals, found, statistic):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  for w, x, wc, xc, wb in ((1, 0, rc, lc, rb), (0, 1, lc, rc, lb)):
    i = owners[w]
    if i is None or owners[x] is not None or wb:
      continue
    value = invals[x]
    # The weight's input axes in its own order, and the operand's axes they meet.
    inputs = tuple(sorted(wc))
    meets = tuple(xc[list(wc).index(a)] for a in inputs)
    others = tuple(a for a in range(value.ndim) if a not in xc)
    total = statistic.dot(jnp.transpose(value, others + meets), len(meets))
    outputs = tuple(a for a in range(invals[w].ndim) if a not in wc)
    _add(totals, found, i, total, inputs, outputs)


def _record_conv(eqn, invals, owners, totals, found, statistic):
  i = owners[1]
  if i is None or owners[0] is not None or eqn.params["feature_group_count"] != 1:
    return
  if statistic.conv is None:
    return
  lhs_spec, rhs_spec, _ = eqn.params["dimension_numbers"]
  value = invals[0]
  feature = lhs_spec[1]
  others = tuple(a for a in range(value.ndim) if a != feature)
  total = statistic.conv(jnp.transpose(value, others + (feature,)), 1)
  _add(totals, found, i, total, (rhs_spec[1],), (rhs_spec[0],))
