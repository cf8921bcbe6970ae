"""Shrinking flax modules: an nnx module in place, linen attribute names.

:func:`shrink` gives arrays and a callable for the smaller model. A flax nnx
module also keeps its widths as attributes (``nnx.Linear.out_features``,
``nnx.BatchNorm.num_features``, ``nnx.MultiHeadAttention.num_heads`` ...),
and an ``nnx.Optimizer`` keeps moments and masks shaped like the params:
:func:`shrink_module` shrinks all three, so the module runs and the optimizer
goes on. For linen, whose widths are constructor arguments,
:func:`linen_widths` names the attributes of flax's own modules to build the
smaller model with.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import jax
import numpy as np

from optax_prune import _coupling
from optax_prune import _paths

def _shape(module: Any, name: str) -> Optional[tuple]:
  """The shape of the array variable ``module.name``, None if it has none."""
  variable = getattr(module, name, None)
  if not hasattr(variable, "get_value"):
    return None
  value = variable.get_value()
  return None if value is None else tuple(np.shape(value))


def _nnx_widths(module: Any) -> dict[str, Any]:
  """The width attributes of one nnx module, from its arrays (``{}``: none)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  if isinstance(module, nnx.MultiHeadAttention):
    query, key = _shape(module.query, "kernel"), _shape(module.key, "kernel")
    value, out = _shape(module.value, "kernel"), _shape(module.out, "kernel")
    if value[1:] != query[1:]:
      raise ValueError(
          f"nnx.MultiHeadAttention takes one head depth for query, key and value; shrunk,"
          f" query kernels would be {query} and value kernels {value}. Leave the value"
          " depth group out of `groups` (prune and shrink heads, not their depth).")
    return {"num_heads": query[1], "head_dim": query[2], "qkv_features": query[1] * query[2],
            "in_features": query[0], "in_kv_features": key[0], "num_kv_heads": key[1],
            "out_features": out[-1]}
  if isinstance(module, nnx.Conv):
    kernel, groups = _shape(module, "kernel"), module.feature_group_count
    widths = {"kernel_shape": kernel, "out_features": kernel[-1]}
    if groups > 1 and groups == module.in_features:  # Depthwise: one group per channel.
      widths["in_features"] = widths["feature_group_count"] = kernel[-1] * groups // (
          module.out_features)
    else:
      widths["in_features"] = kernel[-2] * groups
    return widths
  if isinstance(module, nnx.LinearGeneral):
    kernel = _shape(module, "kernel")
    n_in = len(module.in_features)
    return {"in_features": kernel[:n_in], "out_features": kernel[n_in:]}
  if isinstance(module, nnx.Linear):
    kernel = _shape(module, "kernel")
    return {"in_features": kernel[0], "out_features": kernel[1]}
  if isinstance(module, nnx.Embed):
    table = _shape(module, "embedding")
    return {"num_embeddings": table[0], "features": table[1]}
  if hasattr(module, "num_features"):  # BatchNorm, LayerNorm, RMSNorm, GroupNorm.
    for name in ("scale", "bias", "mean", "var"):
      if _shape(module, name) is not None:
        return {"num_features": _shape(module, name)[-1]}
  return {}


def shrink_module(model: Any, groups: Any, optimizer: Any = None) -> _coupling.Shrunk:
  """Removes the pruned channels of an nnx module in place: arrays, widths, optimizer.

  The module's params and other variables (batch statistics) are cut as
  :func:`shrink` cuts them; the attributes of flax's modules that hold
  widths (``in_features``, ``out_features``, ``num_features``, ``features``,
  ``num_heads``, ``head_dim``, ``qkv_features``, ``num_kv_heads``, a
  depthwise ``Conv``'s ``feature_group_count``, ``kernel_shape``) are set
  from the new arrays, and any other integer attribute of the model equal to
  a removed width is named in a warning (a model's own ``self.width`` may
  need a look). Given ``optimizer``, every leaf of its state shaped like a
  param (Adam's moments, the pruning masks) is cut the same way, so the same
  ``nnx.Optimizer`` goes on training the smaller module.

  A pruning link in the optimizer's chain was built for the old widths: give
  it no further mask updates (shrink after the schedule's last update, or
  prune one-shot with :func:`prune` and fine-tune with a plain optimizer).

  Args:
    model: an ``nnx.Module``, in inference mode (``model.eval()``) as for
      :func:`channel_groups`, whose groups were found on ``nnx.split(model,
      nnx.Param, ...)``.
    groups: as for :func:`shrink`.
    optimizer: an ``nnx.Optimizer`` over ``model`` (``wrt=nnx.Param``), or
      None.

  Returns:
    The :class:`Shrunk` of :func:`shrink` (its ``params`` and ``state`` are
    now the module's).

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    >>> fn = lambda p, s, x: nnx.merge(graphdef, p, s)(x)
    >>> groups = optax_prune.channel_groups(fn, params, jnp.ones((3, 5)), state=rest)
    >>> pruned, _ = optax_prune.prune(params, 0.5,
    ...                               granularity=optax_prune.coupled_channels(groups))
    >>> nnx.update(model, pruned)
    >>> small = optax_prune.shrink_module(model, groups)
    >>> model.layers[0].out_features, model(jnp.ones((3, 5))).shape
    (2, (3, 2))
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  if not isinstance(model, nnx.Module):
    raise ValueError(f"`model` must be an nnx.Module; got {type(model).__name__}. For linen,"
                     " use `shrink` and `linen_widths`.")
  if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
    raise ValueError(f"`optimizer` must be the nnx.Optimizer over `model` (or None); got"
                     f" {type(optimizer).__name__}.")
  # nnx.split's states share the module's variables: hold the arrays themselves.
  params, rest = jax.tree.map(lambda x: x, nnx.split(model, nnx.Param, ...)[1:])
  chosen = _coupling.checked_groups(groups, "groups")
  small, cuts = _coupling.shrink_with_cuts(chosen, params, rest)
  before = {path: _int_attributes(module) for path, module in nnx.iter_modules(model)}
  nnx.update(model, small.params, small.state)
  try:
    widths = {path: _nnx_widths(module) for path, module in nnx.iter_modules(model)}
  except ValueError:
    nnx.update(model, params, rest)  # Nothing changed.
    raise
  if optimizer is not None:
    _shrink_optimizer(optimizer, cuts, params)
  old_widths = {g.size for g in chosen if small.sizes[g.name] != g.size}
  old_widths |= {outer * g.size * inner for g in chosen if small.sizes[g.name] != g.size
                 for _, _, outer, inner in g.views()}
  stale = []
  for path, module in nnx.iter_modules(model):
    for name, value in widths[path].items():
      setattr(module, name, value)
    for name, value in before[path].items():
      if name not in widths[path] and value in old_widths:
        stale.append(f"{'.'.join(map(str, path)) or 'model'}.{name} = {value}")
  if stale:
    warnings.warn(
        f"`shrink_module` left integer attributes equal to a removed width: {', '.join(stale)}."
        " If the module computes shapes from them, set them to the new widths"
        f" ({small.sizes}).", UserWarning, stacklevel=2)
  return small


def _int_attributes(module: Any) -> dict[str, int]:
  return {name: value for name, value in vars(module).items()
          if isinstance(value, int) and not isinstance(value, bool) and not name.startswith("_")}


def _shrink_optimizer(optimizer: Any, cuts: dict, params: Any) -> None:
  """Cuts the optimizer's leaves that stand for a param (the longest path
  suffix naming a param of the same shape)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  shapes = {jax.tree_util.keystr(_paths.normalized(path)): np.shape(x)
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  state = nnx.state(optimizer, nnx.OptState)

  shape_at = {path: np.shape(x) for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}

  def member(path):
    keys = _paths.normalized(path)
    # Longest suffix first: ['opt_state'][0][0]['mu']['up']['kernel'] -> ['up']['kernel'].
    for start in range(len(keys)):
      name = jax.tree_util.keystr(tuple(keys[start:]))
      if shapes.get(name) == shape_at[path]:
        return name
    return None

  nnx.update(optimizer, _coupling.cut(cuts, _coupling.PARAMS, state, path_of=member))


def linen_widths(params: Any, small_params: Any) -> dict[str, dict[str, int]]:
  """The constructor arguments of flax linen's own modules that :func:`shrink` changed.

  Read from the params: a ``Dense`` or ``Conv`` (a ``kernel`` leaf) has
  ``features`` = the kernel's last axis; a ``MultiHeadDotProductAttention``
  (``query``/``key``/``value``/``out`` with ``(in, heads, head_dim)``
  kernels) has ``num_heads``, ``qkv_features`` and ``out_features``. Only
  modules whose widths changed are listed. Modules of your own name their
  widths themselves: :func:`shrink`'s ``apply`` runs the smaller model
  without them.

  Args:
    params: the params the groups were found on.
    small_params: ``shrink(...).params``.

  Returns:
    ``{module path: {attribute: new value}}``, for example
    ``{"['Dense_0']": {"features": 32}}``.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> params = {"Dense_0": {"kernel": jnp.ones((5, 4)), "bias": jnp.ones(4)}}
    >>> small = {"Dense_0": {"kernel": jnp.ones((5, 2)), "bias": jnp.ones(2)}}
    >>> optax_prune.linen_widths(params, small)
    {"['Dense_0']": {'features': 2}}
  """
  old, new = _modules_of(params), _modules_of(small_params)
  attention = [path for path, leaves in new.items() if _linen_module_widths(leaves).get("num_heads")]
  out = {}
  for path, leaves in new.items():
    if any(path.startswith(a) and path != a for a in attention):
      continue  # The projections of an attention module: its own widths say it.
    before, after = _linen_module_widths(old.get(path, {})), _linen_module_widths(leaves)
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    if changed:
      out[path] = changed
  return out


def _modules_of(params: Any) -> dict[str, dict[str, tuple]]:
  """``{module path: {leaf name or child/leaf: shape}}`` of a params tree."""
  out: dict = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = _paths.normalized(path)
    for depth in (1, 2):  # The module holding the leaf, and its parent (attention).
      if len(keys) > depth:
        module = jax.tree_util.keystr(tuple(keys[:-depth]))
        name = "/".join(str(getattr(k, "key", k)) for k in keys[-depth:])
        out.setdefault(module, {})[name] = np.shape(x)
  return out


def _linen_module_widths(leaves: dict[str, tuple]) -> dict[str, int]:
  query, out = leaves.get("query/kernel"), leaves.get("out/kernel")
  if query is not None and out is not None and len(query) == 3:
    return {"num_heads": query[1], "qkv_features": query[1] * query[2],
            "out_features": out[-1]}
  kernel = leaves.get("kernel")
  if kernel is not None and len(kernel) >= 2:
    return {"features": kernel[-1]}
  return {}
