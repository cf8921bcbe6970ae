"""Coupled channel groups: which parameter axes must shrink together.

A Dense layer's output units are also the next layer's input rows, its
bias's entries, a BatchNorm's scale, bias and running statistics, and the
other side of every residual add they meet. :func:`channel_groups` finds
these groups by tracing the model to a jaxpr and following each array axis
through every primitive (a union-find over ``(variable, axis)`` pairs), not
by layer names; :func:`shrink` then slices the pruned channels out of every
member, so a model built with the new sizes computes what the masked model
computed.

Removing channel ``c`` of a group is exact when the masked model's values at
``c`` never reach the outputs: every place where ``c`` meets other channels
must be a contraction with a *weight* (a value computed from params and
state alone) that is exactly zero at ``c`` (a masked kernel). A group is
refused (``reason`` says why, its axes are left alone) when one of its axes

* is an input or an output of the model;
* is reduced over (a mean or a norm: LayerNorm's statistics change with the
  number of channels), concatenated, sliced, indexed, padded, reversed,
  sorted or scanned;
* is merged with other axes or split into several by a reshape, unless
  one part can hold the units: a flatten of positions and channels before a
  Dense layer is followed (that layer's rows of a channel go with it, see
  ``ChannelGroup.flat_members``), and so are attention heads behind a
  reshape, ``heads * head_dim -> (heads, head_dim)`` and back (the part
  with parameters, else the first one that is not refused: ``heads``; the
  axis then shrinks by whole blocks of ``head_dim`` entries). Refused: a
  reshape where more than one part holds parameters or none is free, and
  heads merged back in another order than they were split;
* is cut into pieces (``split``, slices), unless into equal contiguous
  pieces, all read, that each hold the same units (a fused q/k/v kernel:
  the same head in each third);
* is contracted between two activations (attention logits, scaled by
  ``1 / sqrt(depth)``: a shrunk model would scale them by its new depth), or
  with a factor that is not zero at pruned channels;
* meets a primitive not analysed here (a loop, a custom call): every axis it
  touches is refused;
* holds positions (``iota``: ``jnp.arange``, ``one_hot``), which renumber
  when a channel goes, or a constant captured by the model's code, which
  ``shrink`` cannot cut;
* belongs to a parameter the model never reads, or has a single channel.

"Equal outputs" is meant where the masked model is finite: a pruned channel
that becomes ``inf`` (``log`` of a zero activation) and meets a zero weight
gives NaN there and not in the shrunk model.

What the jaxpr cannot show is a constant computed in Python from an axis's
size (``x / x.shape[-1]`` on a channel axis); such a model must be checked
by comparing outputs, as ``tests/test_coupling.py`` does.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from optax_prune import _paths
from optax_prune import _small_model
from optax_prune import _tables

PARAMS, STATE, INPUT = "params", "state", "input"

# Elementwise primitives (operands of the output's shape, or size-1 axes
# broadcast). f(0) = 0 for the unary ones in `_ZERO_UNARY`.
_ELEMENTWISE = frozenset("""
abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp
convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp
exp2 expm1 floor ge gt igamma imag integer_pow is_finite le lgamma log log1p
logistic lt max min mul ne neg nextafter not or pow real reduce_precision rem
round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan tanh xor
""".split())
_ZERO_UNARY = frozenset("""
abs asin asinh atan atanh cbrt ceil convert_element_type copy copy_p erf expm1
floor log1p neg real reduce_precision round sign sin sinh sqrt square
stop_gradient tan tanh
""".split())
_ZERO_IF_ALL = frozenset({"add", "add_any", "sub", "max", "min", "select_n"})
_IDENTITY = frozenset({"sharding_constraint", "optimization_barrier", "pvary"})
_REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                     "reduce_and", "reduce_or", "argmax", "argmin"})
_ALONG_AXIS = {"cumsum": "axis", "cumprod": "axis", "cummax": "axis",
               "cummin": "axis", "cumlogsumexp": "axis", "split": "axis",
               "sort": "dimension", "rev": "dimensions"}
# Calls of a nested jaxpr that runs once on the operands (not a reducer).
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "checkpoint",
                    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_SUBJAXPR = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_RESHAPED = "merged with or split from another axis by a reshape"
_FLATTEN = "flatten"  # Placeholder reason of a flattened axis until it is resolved.
# How a resolved view's axis holds its group's units (part of its own group's
# reason), by the reshape's direction and whether the units' axis holds params.
_HOW = {("merge", True): "a flatten of channels and positions",
        ("split", True): "split into positions and channels by a reshape",
        ("merge", False): "merged from heads (blocks of entries) by a reshape",
        ("split", False): "split into heads (blocks of entries) by a reshape",
        ("pieces", False): "cut into equal pieces (a fused projection)"}


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """Parameter axes that index the same channels and shrink together.

  Attributes:
    size: the number of channels.
    members: ``(path, axis)`` of each parameter axis in the group, paths as
      ``jax.tree_util.keystr`` of the params' leaves (an nnx ``Variable``'s
      ``.value`` dropped).
    state_members: the same for the state (BatchNorm's running statistics).
    flat_members, flat_state_members: ``(path, axis, outer, inner)`` of
      members whose axis holds each channel as a block of entries: seen as
      ``(outer, size, inner)``, its middle part holds the channel. A Dense
      kernel after ``x.reshape(batch, -1)`` of an ``(h, w, c)`` map has
      ``outer = h * w``, ``inner = 1``; a query kernel ``(d, heads *
      head_dim)`` split into heads by a reshape has ``outer = 1``, ``inner =
      head_dim`` (a unit, a head, is ``head_dim`` contiguous columns), a
      fused q/k/v kernel ``outer = 3`` (the head's block in each third).
      Importance sums over a unit's entries; ``shrink`` cuts whole units.
    reason: why the group cannot be removed safely; ``""`` if it can.
    name: ``"path[axis a]"`` of the member that makes the channels: the
      first leaf (kernels first) whose last axis of two or more is in the
      group (a layer's outputs), else the first kernel, else the first member;
      for a group whose members all hold blocks (heads), the same member
      among them, as ``"path[axis a, blocks of 4]"`` (``"3 blocks of 4"`` for
      a fused kernel).
  """

  size: int
  members: tuple[tuple[str, int], ...]
  state_members: tuple[tuple[str, int], ...] = ()
  reason: str = ""
  name: str = ""
  flat_members: tuple[tuple[str, int, int, int], ...] = ()
  flat_state_members: tuple[tuple[str, int, int, int], ...] = ()
  # The traced model, for `shrink`'s callable; not part of the group's value.
  trace: Any = dataclasses.field(default=None, compare=False, repr=False)

  def views(self, kind: str = "params") -> tuple[tuple[str, int, int, int], ...]:
    """``(path, axis, outer, inner)`` of every member of ``kind``
    (``"params"`` or ``"state"``): the axis, seen as ``(outer, size, inner)``,
    holds the channel in its middle part (``outer = inner = 1`` but for
    flattened members)."""
    plain, flat = ((self.members, self.flat_members) if kind == PARAMS
                   else (self.state_members, self.flat_state_members))
    return tuple((path, axis, 1, 1) for path, axis in plain) + tuple(flat)

  @property
  def prunable(self) -> bool:
    return not self.reason


@dataclasses.dataclass(frozen=True)
class ChannelGroups:
  """Every group of coupled parameter axes of a model (see :func:`channel_groups`)."""

  groups: tuple[ChannelGroup, ...]

  @property
  def prunable(self) -> tuple[ChannelGroup, ...]:
    return tuple(g for g in self.groups if g.prunable)

  def __str__(self) -> str:
    rows = [(g.name, g.size, len(g.views("params")) + len(g.views("state")),
             g.reason or "prunable") for g in self.groups]
    return _tables.format_table(("group", "channels", "members", "status"), rows)


def channel_groups(fn: Callable, params: Any, *inputs: Any, state: Any = None) -> ChannelGroups:
  """Finds the groups of parameter axes that must shrink together.

  Traces ``fn`` to a jaxpr (nothing runs) and follows every axis of every
  value through its primitives: an elementwise op or a residual add joins
  its operands' axes, a matmul or convolution joins the contracted axes of
  both sides and passes the others on, a transpose or reshape moves them,
  and so on. Each group of joined axes that holds a parameter axis is
  reported, with the reason it cannot be removed if one of its axes is an
  input or output of the model, is reduced over (LayerNorm), split by a
  reshape, concatenated or sliced, contracted between two activations
  (attention logits), or meets an unknown primitive (see the module
  docstring). Covered: Dense, Conv (grouped only depthwise), pooling,
  Embed, BatchNorm (inference), residual adds, a flatten of positions and
  channels before a Dense layer, flax's multi-head attention, whose heads
  are one group (query, key, value and output projections) and whose
  value/output head depth is another, and heads behind a reshape (BERT,
  GPT-2, ViT as HF's Flax code writes them: one hidden-size projection, or
  a fused q/k/v one cut by ``jnp.split`` or equal slices, reshaped to
  ``(..., heads, head_dim)`` and merged back): a group of ``heads`` units,
  each a block of ``head_dim`` entries of every member (see
  ``ChannelGroup.flat_members``), named ``"path[axis a, blocks of 4]"``.
  Not covered (refused): LayerNorm and GroupNorm axes, concatenations,
  loops (``scan``), a head's depth behind a reshape.

  Args:
    fn: the model in inference mode, returning its outputs only:
      ``fn(params, *inputs)``, or ``fn(params, state, *inputs)`` when
      ``state`` is given. For flax linen:
      ``lambda p, s, x: model.apply({"params": p, **s}, x)``; for nnx:
      ``lambda p, s, x: nnx.merge(graphdef, p, s)(x)``.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    *inputs: example inputs (their shapes matter, not their values; a batch
      larger than 1 keeps the batch axis apart from size-1 axes).
    state: other variables ``fn`` reads (BatchNorm's ``batch_stats``):
      coupled like params but never masked, sliced by :func:`shrink`.

  Returns:
    A :class:`ChannelGroups`; ``str()`` of it is a table.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax_prune
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.ones((4, 3)))["params"]
    >>> groups = optax_prune.channel_groups(
    ...     lambda p, x: model.apply({"params": p}, x), params, jnp.ones((4, 3)))
    >>> [(g.size, g.members) for g in groups.prunable]
    [(8, (("['layers_0']['bias']", 0), ("['layers_0']['kernel']", 1), ("['layers_2']['kernel']", 0)))]
  """
  trees = [(PARAMS, params)] + ([] if state is None else [(STATE, state)])
  named = []  # (tree, path) per flat argument; None for model inputs.
  flat = []
  for kind, tree in trees:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      named.append((kind, jax.tree_util.keystr(_paths.normalized(path))))
      flat.append(leaf)
  input_leaves, input_def = jax.tree.flatten(inputs)
  named += [(INPUT, None)] * len(input_leaves)
  flat += input_leaves
  n_tree = len(flat) - len(input_leaves)
  tree_defs = [jax.tree.structure(tree) for _, tree in trees]

  def flat_fn(*leaves):
    rebuilt, start = [], 0
    for treedef in tree_defs:
      rebuilt.append(treedef.unflatten(leaves[start:start + treedef.num_leaves]))
      start += treedef.num_leaves
    return fn(*rebuilt, *input_def.unflatten(leaves[n_tree:]))

  spec = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in flat]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*spec)
  jaxpr = closed.jaxpr
  graph, env = _Graph(), {}
  invars = [_value(env, var) for var in jaxpr.invars]
  for var, (kind, _) in zip(invars, named):
    graph.weight[var] = kind != INPUT
    for a in range(_ndim(var)):
      graph.zero[(var, a)] = kind == PARAMS
      if kind == INPUT:
        graph.block(graph.node(var, a), "an input of the model")
  graph.run(jaxpr, env, closed.consts)
  outvars = [_value(env, var) for var in jaxpr.outvars]
  for var in outvars:
    graph.block_var(var, "an output of the model")
    graph.read.add(id(var))
  for var in invars:
    if id(var) not in graph.read:
      graph.block_var(var, "not read by the model")
  trace = Trace(fn, graph, invars, outvars, tuple(tree_defs), input_def,
                jax.tree.structure(out_shape), state is not None, inputs)
  return graph.groups(invars, named, trace)


class Trace(NamedTuple):
  """The model as ``channel_groups`` traced it: what ``shrink`` rebuilds at new widths."""

  fn: Callable
  graph: Any  # The `_Graph`: its union-find and its program (the walked equations).
  invars: list  # The jaxpr's inputs: params, then state, then the model's inputs.
  outvars: list
  tree_defs: tuple  # Of params (and state).
  input_def: Any
  out_def: Any
  has_state: bool
  inputs: tuple  # The example inputs.


class _Value:
  """One value at one call site: a nested jaxpr (``relu``'s) is one object
  shared by all its calls, so its variables are renamed per call."""

  __slots__ = ("aval",)

  def __init__(self, aval):
    self.aval = aval


class _Eqn(NamedTuple):
  primitive: Any
  params: dict
  invars: list
  outvars: list


def _value(env: dict, var):
  return var if _literal(var) else env.setdefault(var, _Value(var.aval))


class _Graph:
  """Union-find over ``(var, axis)`` nodes, with per-node refusal reasons."""

  def __init__(self):
    self.ids: dict = {}  # (var, axis) -> node id.
    self.parent: list[int] = []
    self.size: list[int] = []  # Length of the axis.
    self.reasons: dict[int, str] = {}  # node -> first reason it was refused.
    self.zero: dict = {}  # (var, axis) -> slices at pruned channels are 0.
    self.weight: dict = {}  # var -> computed from params and state alone.
    # (flat node, [(node, length) it is merged from or split into], "merge" or "split").
    self.reshapes: list = []
    # (flat node, pieces, index, piece node, reason if unresolved): equal
    # contiguous pieces of an axis (`split`, slices), a fused q/k/v projection.
    self.pieces: list = []
    self.read: set = set()  # ids of the values some primitive reads.
    # The walk in order, nested calls inlined: ("const", var, value),
    # ("alias", var, source) and ("eqn", _Eqn); what `shrink` evaluates.
    self.program: list = []
    # channel root -> [(view root, outer, inner)]: axes that hold the group's
    # units as the middle of (outer, units, inner) (flattens, heads, pieces).
    self.flat: dict = {}
    self.roots: dict = {}  # group name -> its root.

  # -- union-find --
  def node(self, var, axis: int) -> int:
    key = (var, axis)
    if key not in self.ids:
      self.ids[key] = len(self.parent)
      self.parent.append(len(self.parent))
      self.size.append(int(var.aval.shape[axis]))
    return self.ids[key]

  def find(self, i: int) -> int:
    while self.parent[i] != i:
      self.parent[i] = self.parent[self.parent[i]]
      i = self.parent[i]
    return i

  def link(self, a, a_axis, b, b_axis) -> None:
    """Joins two axes (of equal length; literals and size changes are skipped)."""
    if _literal(a) or _literal(b):
      return
    i, j = self.find(self.node(a, a_axis)), self.find(self.node(b, b_axis))
    if i == j:
      return
    if self.size[i] != self.size[j]:
      self.block(i, "joined to an axis of another length")
      self.block(j, "joined to an axis of another length")
      return
    self.parent[j] = i

  def block(self, i: int, reason: str) -> None:
    self.reasons.setdefault(i, reason)

  def block_var(self, var, reason: str, axes=None) -> None:
    if _literal(var):
      return
    for a in range(_ndim(var)) if axes is None else axes:
      self.block(self.node(var, a), reason)

  def is_zero(self, var, axis) -> bool:
    if _literal(var):
      return _literal_zero(var)
    return self.zero.get((var, axis), False)

  def is_weight(self, var) -> bool:
    return _literal(var) or self.weight.get(var, False)

  # -- the walk --
  def run(self, jaxpr, env: dict, consts=()) -> None:
    """Walks ``jaxpr`` with its variables renamed by ``env`` (var -> _Value)."""
    for var, value in zip(jaxpr.constvars, consts):
      self.program.append(("const", _value(env, var), value))
    for var in jaxpr.constvars:
      var = _value(env, var)
      self.weight[var] = True
      # An array captured by the model's code: `shrink` cannot cut it.
      self.block_var(var, "a constant captured by the model")
    for eqn in jaxpr.eqns:
      eqn = _Eqn(eqn.primitive, eqn.params, [_value(env, v) for v in eqn.invars],
                 [_value(env, v) for v in eqn.outvars])
      self.read.update(id(v) for v in eqn.invars)
      for var in eqn.outvars:
        self.weight[var] = all(self.is_weight(v) for v in eqn.invars)
      name = eqn.primitive.name
      sub = next((eqn.params[k] for k in _SUBJAXPR if k in eqn.params), None)
      if not (sub is not None and name in _CALLS):
        self.program.append(("eqn", eqn))  # A walked call records its body instead.
      if name in _ELEMENTWISE:
        self._elementwise(eqn)
      elif name in _IDENTITY:
        for a, b in zip(eqn.invars, eqn.outvars):
          self._same(a, b)
      elif name == "dot_general":
        self._dot_general(eqn)
      elif name == "conv_general_dilated":
        self._conv(eqn)
      elif name == "broadcast_in_dim":
        self._broadcast(eqn)
      elif name in ("reshape", "squeeze", "expand_dims"):
        self._reshape(eqn)
      elif name == "transpose":
        (x,), (y,) = eqn.invars, eqn.outvars
        for out_axis, in_axis in enumerate(eqn.params["permutation"]):
          self._pass(x, in_axis, y, out_axis)
      elif name in _REDUCE:
        self._reduce(eqn)
      elif (name == "split" and len(set(eqn.params["sizes"])) == 1
            and len(eqn.outvars) > 1 and eqn.params["sizes"][0] > 1):
        self._split(eqn)
      elif name in _ALONG_AXIS:
        self._along_axis(eqn, eqn.params[_ALONG_AXIS[name]], f"`{name}` runs along it")
      elif name == "concatenate":
        self._along_axis(eqn, eqn.params["dimension"], "concatenated")
      elif name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min"):
        self._window(eqn)
      elif name == "pad":
        self._pad(eqn)
      elif name in ("slice", "dynamic_slice"):
        self._slice(eqn)
      elif name == "gather":
        self._gather(eqn)
      elif name == "iota":
        # Values that are positions (arange, one_hot): removing a channel
        # would renumber the rest.
        self.block_var(eqn.outvars[0], "indexed by position (iota)")
      elif name in ("rng_bit_generator", "random_bits", "random_seed",
                    "random_wrap", "random_unwrap"):
        pass  # No channel flows in.
      elif sub is not None and name in _CALLS:
        self._call(eqn, sub)
      else:
        reason = f"`{name}` is not analysed"
        for var in list(eqn.invars) + list(eqn.outvars):
          self.block_var(var, reason)

  def _pass(self, x, x_axis, y, y_axis, zero=None) -> None:
    """``y``'s axis carries ``x``'s channels (zero where ``x`` is, unless told)."""
    self.link(x, x_axis, y, y_axis)
    self.zero[(y, y_axis)] = self.is_zero(x, x_axis) if zero is None else zero

  def _same(self, x, y) -> None:
    for a in range(_ndim(y)):
      self._pass(x, a, y, a)

  def _elementwise(self, eqn) -> None:
    name = eqn.primitive.name
    (y,) = eqn.outvars
    shape = y.aval.shape
    values = eqn.invars[1:] if name == "select_n" else eqn.invars
    for a, size in enumerate(shape):
      aligned = [v for v in eqn.invars if _ndim(v) == len(shape)
                 and v.aval.shape[a] == size]
      aligned_ids = {id(v) for v in aligned}
      for v in aligned:
        if _literal(v) and size > 1:
          self.block(self.node(y, a), "a constant captured by the model")
        self.link(v, a, y, a)
      # Whether y's slices at pruned channels are exactly 0.
      zeros = [id(v) in aligned_ids and self.is_zero(v, a) or _literal_zero(v)
               for v in values]
      if name in _ZERO_UNARY or (name == "integer_pow" and eqn.params["y"] > 0):
        zero = zeros[0]
      elif name in _ZERO_IF_ALL:
        zero = all(zeros)
      elif name == "mul":
        zero = any(zeros)
      elif name == "div":  # 0 / 0 is NaN: only a nonzero literal divides safely.
        zero = zeros[0] and _literal(values[1]) and not _literal_zero(values[1])
      else:
        zero = False
      self.zero[(y, a)] = zero

  def _dot_general(self, eqn) -> None:
    (lhs, rhs), (y,) = eqn.invars, eqn.outvars
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for a, b in zip(lc, rc):
      self._contract(lhs, a, rhs, b)
    out = 0
    for a, b in zip(lb, rb):
      self._pass(lhs, a, y, out, self.is_zero(lhs, a) or self.is_zero(rhs, b))
      self.link(rhs, b, y, out)
      out += 1
    for x, skip in ((lhs, set(lc) | set(lb)), (rhs, set(rc) | set(rb))):
      for a in range(_ndim(x)):
        if a not in skip:
          self._pass(x, a, y, out)
          out += 1

  def _contract(self, lhs, a, rhs, b) -> None:
    """Channels summed over: safe only against a weight that is 0 at them."""
    self.link(lhs, a, rhs, b)
    if not (self.is_weight(lhs) and self.is_zero(lhs, a)
            or self.is_weight(rhs) and self.is_zero(rhs, b)):
      reason = ("contracted between two activations (attention logits: a shrunk"
                " model would rescale them)")
      if self.is_weight(lhs) or self.is_weight(rhs):
        reason = "contracted with a weight that is not zero at pruned channels"
      self.block_var(lhs, reason, [a])
      self.block_var(rhs, reason, [b])

  def _conv(self, eqn) -> None:
    (lhs, rhs), (y,) = eqn.invars, eqn.outvars
    lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
    groups = eqn.params["feature_group_count"]
    window = "a convolution window"
    self.block_var(rhs, window, rhs_spec[2:])
    self.block_var(lhs, window, lhs_spec[2:])
    self.block_var(y, window, out_spec[2:])
    self._pass(lhs, lhs_spec[0], y, out_spec[0])
    if eqn.params["batch_group_count"] != 1:
      for var in (lhs, rhs, y):
        self.block_var(var, "a convolution with batch groups")
    elif groups == 1:
      self._contract(lhs, lhs_spec[1], rhs, rhs_spec[1])
      self._pass(rhs, rhs_spec[0], y, out_spec[1])
    elif rhs.aval.shape[rhs_spec[1]] == 1 and rhs.aval.shape[rhs_spec[0]] == groups:
      # Depthwise: each channel is convolved on its own.
      self.block_var(rhs, "the depthwise kernel's unit axis", [rhs_spec[1]])
      self._pass(rhs, rhs_spec[0], y, out_spec[1],
                 self.is_zero(rhs, rhs_spec[0]) or self.is_zero(lhs, lhs_spec[1]))
      self.link(lhs, lhs_spec[1], y, out_spec[1])
    else:
      reason = "a grouped convolution (only depthwise is analysed)"
      for var, axes in ((lhs, [lhs_spec[1]]), (rhs, rhs_spec[:2]), (y, [out_spec[1]])):
        self.block_var(var, reason, axes)

  def _broadcast(self, eqn) -> None:
    (x,), (y,) = eqn.invars[:1], eqn.outvars
    for a, b in enumerate(eqn.params["broadcast_dimensions"]):
      if x.aval.shape[a] == y.aval.shape[b]:
        self._pass(x, a, y, b)

  def _reshape(self, eqn) -> None:
    x, (y,) = eqn.invars[0], eqn.outvars
    ins = [(a, s) for a, s in enumerate(x.aval.shape) if s != 1]
    outs = [(a, s) for a, s in enumerate(y.aval.shape) if s != 1]
    i = j = 0
    while i < len(ins) and j < len(outs):
      if ins[i][1] == outs[j][1]:
        self._pass(x, ins[i][0], y, outs[j][0])
        i, j = i + 1, j + 1
        continue
      # Merged or split: take axes on both sides until the products meet.
      i0, j0, p, q = i, j, ins[i][1], outs[j][1]
      i, j = i + 1, j + 1
      while p != q:
        if p < q:
          p, i = p * ins[i][1], i + 1
        else:
          q, j = q * outs[j][1], j + 1
      if j == j0 + 1 or i == i0 + 1:  # A flatten or a split: resolved with the groups.
        merge = j == j0 + 1
        flat, (parts_of, parts) = ((y, outs[j0][0]), (x, ins[i0:i])) if merge else (
            (x, ins[i0][0]), (y, outs[j0:j]))
        self.block(self.node(*flat), _FLATTEN)
        self.reshapes.append((self.node(*flat), [(self.node(parts_of, a), size)
                                                  for a, size in parts],
                              "merge" if merge else "split"))
        continue
      self.block_var(x, _RESHAPED, [a for a, _ in ins[i0:i]])
      self.block_var(y, _RESHAPED, [a for a, _ in outs[j0:j]])

  def _window(self, eqn) -> None:
    (x,), (y,) = eqn.invars, eqn.outvars
    p = eqn.params
    for a in range(_ndim(x)):
      if (p["window_dimensions"][a], p["window_strides"][a], tuple(p["padding"][a]),
          p["base_dilation"][a], p["window_dilation"][a]) == (1, 1, (0, 0), 1, 1):
        self._pass(x, a, y, a)
      else:
        self.block_var(x, "pooled over", [a])
        self.block_var(y, "pooled over", [a])

  def _reduce(self, eqn) -> None:
    (x,), (y,) = eqn.invars, eqn.outvars
    axes = set(eqn.params["axes"])
    self.block_var(x, "reduced over (a mean or norm changes with its size)", axes)
    kept = [a for a in range(_ndim(x)) if a not in axes]
    keeps_zero = eqn.primitive.name in ("reduce_sum", "reduce_max", "reduce_min")
    for out_axis, a in enumerate(kept):
      self._pass(x, a, y, out_axis, keeps_zero and self.is_zero(x, a))

  def _along_axis(self, eqn, axes, reason: str) -> None:
    ndim = _ndim(eqn.outvars[0])
    axes = {a % ndim for a in (axes if isinstance(axes, (tuple, list)) else [axes])}
    arrays = [v for v in eqn.invars if _ndim(v) == ndim]
    keeps_zero = eqn.primitive.name != "cumlogsumexp"  # log(k) from k zeros.
    for var in arrays + list(eqn.outvars):
      self.block_var(var, reason, axes)
    for a in range(ndim):
      if a in axes:
        continue
      for y in eqn.outvars:
        for x in arrays:
          self.link(x, a, y, a)
        self.zero[(y, a)] = keeps_zero and all(self.is_zero(x, a) for x in arrays)

  def _pad(self, eqn) -> None:
    (x, value), (y,) = eqn.invars, eqn.outvars
    for a, config in enumerate(eqn.params["padding_config"]):
      if tuple(config) == (0, 0, 0):
        self._pass(x, a, y, a)
      else:
        self.block_var(x, "padded", [a])
        self.block_var(y, "padded", [a])
    if not _literal_zero(value):
      for a in range(_ndim(y)):
        self.zero[(y, a)] = False

  def _slice(self, eqn) -> None:
    x, (y,) = eqn.invars[0], eqn.outvars
    for a in range(_ndim(x)):
      n, length = x.aval.shape[a], y.aval.shape[a]
      start = 0 if eqn.primitive.name == "dynamic_slice" else eqn.params["start_indices"][a]
      if n == length and start == 0:
        self._pass(x, a, y, a)
      elif (eqn.primitive.name == "slice" and not eqn.params["strides"]
            and 1 < length < n and n % length == 0 and start % length == 0):
        self._piece(x, a, n // length, start // length, y, a, "sliced")
      else:
        self.block_var(x, "sliced", [a])
        self.block_var(y, "sliced", [a])

  def _split(self, eqn) -> None:
    """``split`` into equal sizes: each output is a piece of the axis."""
    (x,), axis = eqn.invars, eqn.params["axis"] % _ndim(eqn.invars[0])
    for index, y in enumerate(eqn.outvars):
      for a in range(_ndim(x)):
        if a == axis:
          self._piece(x, a, len(eqn.outvars), index, y, a, "`split` runs along it")
        else:
          self._pass(x, a, y, a)

  def _piece(self, x, x_axis, pieces, index, y, y_axis, reason) -> None:
    """``y``'s axis is piece ``index`` of ``pieces`` equal contiguous ones of
    ``x``'s (a third of a fused q/k/v projection): resolved with the groups."""
    if _literal(x):
      return
    self.block(self.node(x, x_axis), _FLATTEN)
    self.pieces.append((self.node(x, x_axis), pieces, index, self.node(y, y_axis), reason))
    self.zero[(y, y_axis)] = self.is_zero(x, x_axis)

  def _gather(self, eqn) -> None:
    (x, indices), (y,) = eqn.invars, eqn.outvars
    numbers = eqn.params["dimension_numbers"]
    skipped = set(numbers.collapsed_slice_dims) | set(numbers.operand_batching_dims)
    whole = [a for a in range(_ndim(x)) if a not in skipped]
    for a, out_axis in zip(whole, numbers.offset_dims):
      if (eqn.params["slice_sizes"][a] == x.aval.shape[a]
          and a not in numbers.start_index_map):
        self._pass(x, a, y, out_axis)
      else:
        self.block_var(x, "indexed", [a])
        self.block_var(y, "indexed", [out_axis])
    self.block_var(x, "indexed", skipped)
    self.block_var(y, "indexed", [a for a in range(_ndim(y)) if a not in numbers.offset_dims])
    self.block_var(indices, "indexed")

  def _call(self, eqn, sub) -> None:
    """A nested jaxpr (jit, custom_jvp/vjp, remat): walked in place."""
    inner = getattr(sub, "jaxpr", sub)
    shapes = lambda vs: [getattr(v.aval, "shape", None) for v in vs]
    if (shapes(inner.invars) != shapes(eqn.invars)
        or shapes(inner.outvars) != shapes(eqn.outvars)):
      reason = f"`{eqn.primitive.name}` is not analysed"
      for var in list(eqn.invars) + list(eqn.outvars):
        self.block_var(var, reason)
      self.program.append(("eqn", eqn))  # Run as it is: none of its axes shrink.
      return
    env = {}
    for outer, var in zip(eqn.invars, inner.invars):
      var = _value(env, var)
      self.program.append(("alias", var, outer))
      self.weight[var] = self.is_weight(outer)
      if not _literal(outer):
        self._same(outer, var)
    self.run(inner, env, getattr(sub, "consts", ()))
    for var, outer in zip(inner.outvars, eqn.outvars):
      var = _value(env, var)
      self.program.append(("alias", outer, var))
      self.weight[outer] = self.is_weight(var)
      if not _literal(var):
        self._same(var, outer)

  # -- the result --
  def groups(self, invars, named, trace=None) -> ChannelGroups:
    found: dict[int, dict] = {}  # root -> members by kind, and their ndim.
    for var, (kind, path) in zip(invars, named):
      if kind == INPUT:
        continue
      for a in range(_ndim(var)):
        entry = found.setdefault(self.find(self.node(var, a)),
                                 {PARAMS: [], STATE: [], "ndim": {}})
        entry[kind].append((path, a))
        entry["ndim"][path, a] = _ndim(var)
    reasons: dict[int, list] = {}
    for i, reason in self.reasons.items():
      reasons.setdefault(self.find(i), []).append(reason)
    flat, via = self._resolve_views(found, reasons)
    self.flat = flat
    ndim = {m: n for entry in found.values() for m, n in entry["ndim"].items()}
    # Named after a layer's outputs: a kernel's last axis, else any kernel.
    rank = lambda m: (not (ndim[m] >= 2 and m[1] == ndim[m] - 1), "kernel" not in m[0], m)
    names = {}
    for root, entry in found.items():
      if entry[PARAMS]:
        path, axis = min(entry[PARAMS], key=rank)
        names[root] = f"{path}[axis {axis}]"
    for root, views in flat.items():  # Units only seen through views: heads.
      viewed = [(path, axis, outer, inner) for merged, outer, inner in views
                for path, axis in found.get(merged, {}).get(PARAMS, ())]
      if root not in names and viewed:
        path, axis, outer, inner = min(viewed, key=lambda m: rank(m[:2]))
        names[root] = f"{path}[axis {axis}, {_blocks(outer, inner)}]"
    groups = []
    for root, name in names.items():
      views = {kind: tuple(sorted((path, axis, outer, inner)
                                  for merged, outer, inner in flat.get(root, ())
                                  for path, axis in found.get(merged, {}).get(kind, ())))
               for kind in (PARAMS, STATE)}
      own = [r for r in reasons.get(root, ()) if r != _FLATTEN]
      if _FLATTEN in reasons.get(root, ()):
        unit, how = via.get(root, (None, None))
        own.append(f"{_HOW[how]}; shrinks with the group of {names[unit]}"
                   if unit in names else _RESHAPED)
      if self.size[root] == 1:
        own.append("a single channel")
      entry = found.get(root, {})
      groups.append(ChannelGroup(
          self.size[root], tuple(sorted(entry.get(PARAMS, ()))),
          tuple(sorted(entry.get(STATE, ()))), own[0] if own else "", name,
          views[PARAMS], views[STATE], trace))
      self.roots[name] = root
    return ChannelGroups(tuple(sorted(groups, key=lambda g: (not g.prunable, g.members))))

  def _resolve_views(self, found, reasons) -> tuple[dict, dict]:
    """The axes that hold a group's units as blocks: ``(flat, via)``.

    ``flat`` maps a unit root to ``[(view root, outer, inner)]``: the view
    root's axis, seen as ``(outer, units, inner)``, holds unit ``u`` in its
    middle part at ``u``; ``via`` maps a view root to ``(unit root, how)``.
    ``reasons`` gains the refusals of what cannot be resolved (and the unit
    roots inherit their views' refusals).

    * A reshape that merges axes into one (a flatten) or splits one into
      several (``heads * head_dim -> (heads, head_dim)``): the flat axis is a
      view of one of its parts, the only unrefused part of length > 1 with
      parameters, else (no part has any: heads) the first unrefused part of
      length > 1 (``heads`` before ``head_dim``, whose q/k side is refused as
      contracted between two activations). A flat axis reshaped twice, a part
      chosen in one reshape and kept whole (or itself reshaped) in another,
      is refused (``_RESHAPED``); so are the other roots of such a reshape.
    * Equal contiguous pieces of an axis (``split``, or slices of a fused
      q/k/v projection), every piece read: a view of the pieces' unit root
      when every piece is a view of it with the same ``(outer, inner)``
      (each third split into the same heads), with ``outer`` times the pieces.
    """
    has_params = lambda r: bool(found.get(r, {}).get(PARAMS))
    blocked = lambda r: any(x != _FLATTEN for x in reasons.get(r, ()))
    records = [(self.find(flat), [self.find(node) for node, _ in parts],
                [length for _, length in parts], how) for flat, parts, how in self.reshapes]
    flats = collections.Counter(root for root, *_ in records)
    failed: set = set()
    while True:  # Failures block their roots, which may change other choices.
      chosen = {}
      for i, (_, roots, lengths, _) in enumerate(records):
        free = [k for k, r in enumerate(roots) if lengths[k] > 1 and not blocked(r)]
        with_params = [k for k in free if has_params(roots[k])]
        if i not in failed and (len(with_params) == 1 or free and not with_params):
          chosen[i] = (with_params or free)[0]
      units = {records[i][1][k] for i, k in chosen.items()}
      viewed = {records[i][0] for i in chosen}
      bad = {i for i, (root, roots, _, _) in enumerate(records) if i not in failed and (
          i not in chosen or flats[root] > 1 or root in roots or root in units
          or any(r in viewed or (k != chosen[i] and r in units) for k, r in enumerate(roots)))}
      if not bad:
        break
      failed |= bad
      for i in bad:
        for r in records[i][1] + [records[i][0]]:
          reasons.setdefault(r, []).append(_RESHAPED)
    view_of = {}  # view root -> (unit root, outer, inner, how)
    kept_whole = set()  # Parts that keep their length.
    for i, k in chosen.items():
      root, roots, lengths, how = records[i]
      view_of[root] = (roots[k], math.prod(lengths[:k]), math.prod(lengths[k + 1:]),
                       (how, has_params(roots[k])))
      kept_whole.update(r for m, r in enumerate(roots) if m != k)
    units = {unit for unit, *_ in view_of.values()}
    cuts: dict[int, list] = {}
    for flat, pieces, index, piece, reason in self.pieces:
      cuts.setdefault(self.find(flat), []).append((pieces, index, self.find(piece), reason))
    for root, cut in cuts.items():
      targets = {view_of.get(p, (p, 1, 1))[:3] for _, _, p, _ in cut}
      (unit, outer, inner), pieces = min(targets), cut[0][0]
      if (len(targets) == 1 and {n for n, *_ in cut} == {pieces}
          and {index for _, index, _, _ in cut} == set(range(pieces))
          and root not in view_of and root not in units and root not in kept_whole
          and unit != root and unit not in cuts and unit not in kept_whole):
        view_of[root] = (unit, pieces * outer, inner, ("pieces", False))
      else:
        for r in {root} | {p for _, _, p, _ in cut}:
          reasons.setdefault(r, []).append(cut[0][3])
    flat: dict[int, list] = {}
    via = {}
    for root, (unit, outer, inner, how) in view_of.items():
      flat.setdefault(unit, []).append((root, outer, inner))
      via[root] = (unit, how)
      reasons.setdefault(unit, []).extend(r for r in reasons.get(root, ()) if r != _FLATTEN)
    return flat, via


def _blocks(outer: int, inner: int) -> str:
  """How a member holds a unit: ``"blocks of 4"`` (a head), ``"3 blocks of 4"``."""
  return f"{outer} blocks of {inner}" if outer > 1 else f"blocks of {inner}"


def _literal(var) -> bool:
  return isinstance(var, jcore.Literal)


def _literal_zero(var) -> bool:
  return _literal(var) and bool(np.all(np.asarray(var.val) == 0))


def _ndim(var) -> int:
  return len(getattr(var.aval, "shape", ()))


class Shrunk(NamedTuple):
  """What :func:`shrink` returns."""

  params: Any  # The params with pruned channels removed.
  state: Any  # The state likewise (None if none was given).
  sizes: dict[str, int]  # Group name -> channels kept: the new layer sizes.
  # The smaller model, `apply(params, [state,] *inputs)`: the traced model at the
  # new widths (None for groups without a trace).
  apply: Any = None
  max_abs_diff: float = float("nan")  # Of `apply` against the masked model, on the example inputs.


def shrink(groups: Any, params: Any, state: Any = None) -> Shrunk:
  """Removes the pruned channels of coupled groups: a smaller dense model.

  A channel of a group is removed when every parameter member's slice at it
  is exactly zero (as :func:`magnitude_pruning` with
  :func:`coupled_channels` leaves it, or any other way of zeroing it), and
  then from every member, state (running statistics) included. By the
  analysis behind :func:`channel_groups`, a model built with the new sizes
  and given the shrunk params computes the masked model's outputs (to float
  rounding: sums run over fewer terms, the removed ones exactly 0).

  Args:
    groups: a :class:`ChannelGroups` (its prunable groups are shrunk) or a
      sequence of :class:`ChannelGroup`; a group that is not prunable is an
      error.
    params: the trained params, of the structure the groups were found for.
    state: the state given to :func:`channel_groups`, if any.

  Returns:
    A :class:`Shrunk`: ``params`` and ``state`` with smaller leaves (same
    structure), ``sizes``, each group's kept channel count by name, and
    ``apply``, the smaller model itself: ``apply(params, [state,] *inputs)``
    with ``fn``'s signature, the jaxpr ``channel_groups`` traced evaluated at
    the new widths (shape parameters rewritten), so a model whose widths are
    literals in its code runs without being rewritten. It runs in the mode
    ``fn`` traced (inference), is jittable, differentiable where ``fn`` is,
    and exports with ``jax.export``. ``shrink`` runs it once on the example
    inputs against the masked model (``max_abs_diff``); when they disagree
    (beyond rtol 1e-5, atol 1e-5 * max|output|) it warns and ``apply`` raises
    with the largest difference. Example inputs given as shapes only are not
    run (``max_abs_diff`` is NaN).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax_prune
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((3, 5))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> groups = optax_prune.channel_groups(
    ...     lambda p, x: model.apply({"params": p}, x), params, x)
    >>> params["layers_0"]["kernel"] = params["layers_0"]["kernel"].at[:, :2].set(0)
    >>> params["layers_0"]["bias"] = params["layers_0"]["bias"].at[:2].set(0)
    >>> params["layers_2"]["kernel"] = params["layers_2"]["kernel"].at[:2].set(0)
    >>> small = optax_prune.shrink(groups, params)
    >>> small.params["layers_0"]["kernel"].shape, small.sizes
    ((5, 2), {"['layers_0']['kernel'][axis 1]": 2})
    >>> small.apply(small.params, x).shape  # The smaller model, as traced.
    (3, 2)
  """
  return shrink_with_cuts(checked_groups(groups, "groups"), params, state)[0]


def shrink_with_cuts(chosen: Sequence[ChannelGroup], params: Any,
                     state: Any) -> tuple[Shrunk, dict]:
  """:func:`shrink` of checked groups, and its :func:`channel_cuts` (for
  other trees shaped like the params, an optimizer's state)."""
  cuts, sizes = channel_cuts(chosen, params, state)
  small_params, small_state = cut(cuts, PARAMS, params), cut(cuts, STATE, state)
  traces = {id(g.trace): g.trace for g in chosen}
  if len(traces) != 1 or None in traces.values():
    return Shrunk(small_params, small_state, sizes), cuts
  (trace,) = traces.values()
  graph = trace.graph
  new_sizes = {}
  for group in chosen:
    root = graph.roots[group.name]
    new_sizes[root] = sizes[group.name]
    for merged, outer, inner in graph.flat.get(root, ()):
      new_sizes[merged] = outer * sizes[group.name] * inner
  apply = _small_model.build(trace, new_sizes)
  try:
    diff = _small_model.check(trace, apply, params, state, small_params, small_state)
  except _small_model.Mismatch as e:
    warnings.warn(f"`shrink` cannot give a callable for this model: {e}", UserWarning,
                  stacklevel=3)
    message = str(e)

    def apply(*args):  # pylint: disable=function-redefined
      raise ValueError(message)
    diff = float("nan")
  return Shrunk(small_params, small_state, sizes, apply, diff), cuts


def channel_cuts(chosen: Sequence[ChannelGroup], params: Any, state: Any) -> tuple[dict, dict]:
  """What :func:`shrink` removes: ``(cuts, sizes)``.

  ``cuts`` maps ``(kind, path)`` to ``[((axis, outer, inner), kept channel
  indices)]``; ``sizes`` each group's kept channel count by name. A channel
  is kept when some parameter member's slice at it is nonzero.
  """
  trees = {PARAMS: params, STATE: state}
  leaves = {kind: _by_path(tree) for kind, tree in trees.items() if tree is not None}
  cuts: dict = {}
  sizes = {}
  for group in chosen:
    kept = np.zeros(group.size, bool)
    for view in group.views(PARAMS):
      x, axis = channel_view(np.asarray(_member(leaves[PARAMS], view, group, "params")),
                             *view[1:])
      kept |= np.any(x != 0, axis=tuple(a for a in range(x.ndim) if a != axis))
    index = np.flatnonzero(kept)
    sizes[group.name] = int(index.size)
    for kind in (PARAMS, STATE):
      views = group.views(kind)
      if views and kind not in leaves:
        raise ValueError(
            f"group {group.name} has members in the state ({views[0][0]}, ...):"
            " pass the `state` that `channel_groups` was given.")
      for view in views:
        _member(leaves[kind], view, group, kind)
        cuts.setdefault((kind, view[0]), []).append((view[1:], index))
  return cuts, sizes


def cut(cuts: dict, kind: str, tree: Any, path_of: Optional[Callable] = None) -> Any:
  """``tree`` with the channels of ``cuts`` removed from its leaves.

  ``path_of(path)``: the member path a leaf at ``path`` stands for (default:
  its own); a leaf whose path has no cuts is returned as it is.
  """
  if tree is None:
    return None
  path_of = path_of or (lambda path: jax.tree_util.keystr(_paths.normalized(path)))
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for path, x in path_leaves:
    for (axis, outer, inner), index in cuts.get((kind, path_of(path)), ()):
      view, channel_axis = channel_view(x, axis, outer, inner)
      shape = list(x.shape)
      shape[axis] = outer * index.size * inner
      x = jnp.take(view, index, axis=channel_axis).reshape(shape)
    out.append(x)
  return treedef.unflatten(out)


def channel_view(x: Any, axis: int, outer: int, inner: int) -> tuple[Any, int]:
  """``x`` with ``axis`` split into ``(outer, channels, inner)`` (NumPy or
  JAX), and the axis of the channels in it."""
  shape = tuple(x.shape)
  channels = shape[axis] // (outer * inner)
  return x.reshape(shape[:axis] + (outer, channels, inner) + shape[axis + 1:]), axis + 1


def checked_groups(groups: Any, name: str) -> tuple[ChannelGroup, ...]:
  """The groups to prune or shrink; refuses any that is not prunable."""
  if isinstance(groups, ChannelGroups):
    return groups.prunable
  if isinstance(groups, ChannelGroup):
    groups = (groups,)
  groups = tuple(groups)
  if not groups or not all(isinstance(g, ChannelGroup) for g in groups):
    raise ValueError(
        f"`{name}` must be a ChannelGroups (from `channel_groups`) or a nonempty"
        f" sequence of its ChannelGroup items; got {groups!r}.")
  seen = set()
  for g in groups:
    if not g.prunable:
      raise ValueError(
          f"`{name}` holds group {g.name}, which cannot be removed safely: it is"
          f" {g.reason}. Pass `channel_groups(...).prunable` or a subset of it.")
    views = {(kind, view[:2]) for kind in (PARAMS, STATE) for view in g.views(kind)}
    if views & seen:
      raise ValueError(
          f"`{name}` holds an axis twice (group {g.name} repeats or overlaps another):"
          " pass each group of one `channel_groups` result once.")
    seen |= views
  return groups


def _by_path(tree: Any) -> dict:
  return {jax.tree_util.keystr(_paths.normalized(path)): x
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _member(leaves: dict, view: tuple, group: ChannelGroup, kind: str):
  """The leaf of a member ``(path, axis, outer, inner)``, checked."""
  path, axis, outer, inner = view
  x = leaves.get(path)
  if (x is None or not 0 <= axis < jnp.ndim(x)
      or jnp.shape(x)[axis] != outer * group.size * inner):
    raise ValueError(
        f"`{kind}` do not match group {group.name}: its member {path} (axis {axis},"
        f" {outer * group.size * inner} entries) is"
        f" {'missing' if x is None else jnp.shape(x)}. Find the groups with"
        " `channel_groups` on these params.")
  return x
