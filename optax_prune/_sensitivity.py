"""Sensitivity analysis: how much each layer can lose, and targets for a budget.

PaddleSlim's ``sensitivity`` and ``get_ratios_by_loss`` (and Distiller's and
NNI's analyses) in one pass: prune one leaf at a time at a sweep of sparsities
(one-shot, the rest dense), evaluate, and choose per-leaf sparsities that meet
a total budget at the smallest loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optax_prune import _checks
from optax_prune import _config
from optax_prune import _distributions
from optax_prune import _granularity
from optax_prune import _plan
from optax_prune import _rules
from optax_prune import _scores
from optax_prune import _tables
from optax_prune import _thresholds

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


@dataclasses.dataclass(frozen=True)
class SensitivityReport:
  """What :func:`sensitivity` measured; ``str()`` gives a table.

  ``losses[path][k]`` is ``evaluate`` of the params with only the leaf at
  ``path`` pruned to ``sparsities[k]``, minus ``baseline`` (so larger is
  worse); ``sizes[path]`` its number of entries.
  """

  baseline: float
  sparsities: tuple[float, ...]
  losses: dict[str, tuple[float, ...]]
  sizes: dict[str, int]

  def __str__(self) -> str:
    header = ("leaf", "size", *(f"{s:.0%}" for s in self.sparsities))
    rows = [(path, str(self.sizes[path]), *(f"{x:+.4g}" for x in losses))
            for path, losses in self.losses.items()]
    return (f"baseline {self.baseline:.6g}; loss increase when one leaf is pruned:\n"
            + _tables.format_table(header, rows, left=1))

  def plot(self, ax=None):
    """Loss increase against sparsity, a curve per leaf (needs matplotlib)."""
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    if ax is None:
      _, ax = plt.subplots(figsize=(6, 4))
    for path, losses in self.losses.items():
      ax.plot(self.sparsities, losses, marker="o", label=path)
    ax.set_xlabel("sparsity of the leaf (others dense)")
    ax.set_ylabel("loss increase")
    ax.legend(fontsize="small")
    return ax


def sensitivity(
    params: Any,
    evaluate: Callable[[Any], Any],
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    where: Any = None,
    granularity: Any = None,
    score: Any = "magnitude",
    threshold: str = "auto",
    layer_axis: Any = None,
    higher_is_better: Optional[bool] = None,
    progress: bool = False,
) -> SensitivityReport:
  r"""Prunes one leaf at a time at each sparsity and measures ``evaluate``.

  For every leaf that :func:`magnitude_pruning` would prune (``where``), and
  every :math:`s` in ``sparsities``, the leaf alone is pruned one-shot
  (exactly :math:`\mathrm{round}(s \cdot n)` of its units, as the
  transformation does; the other leaves dense) and
  :math:`\mathrm{evaluate}(\text{params}) - \mathrm{evaluate}(\text{dense})`
  is recorded (its negation for a metric where higher is better), so larger
  is always worse. One compile per leaf shape: the sparsity is an argument.

  Args:
    params: trained params.
    evaluate: ``params -> float`` on held-out data: a loss (lower is
      better), or a metric such as accuracy with ``higher_is_better=True``.
    sparsities: increasing sparsities in [0, 1].
    where, granularity, score, threshold: as for :func:`magnitude_pruning`.
    layer_axis: as for :func:`magnitude_pruning`: a stack of layers gets one
      curve, all its layers pruned together, each to ``round(s * n)`` of its
      own units (the allocation then gives the stack one sparsity).
    higher_is_better: whether larger values of ``evaluate`` are better (an
      accuracy: PaddleSlim's convention). ``None`` (default) reads it as a
      loss and warns when most curves fall as sparsity rises (the sign of an
      accuracy, which would send the budget to the most sensitive leaves);
      ``False`` reads a loss without the check.
    progress: show a progress bar (needs ``tqdm``).

  Returns:
    A :class:`SensitivityReport`; :func:`sparsities_for_budget` turns it into
    per-leaf targets.

  Examples:
    >>> import jax.numpy as jnp, optax_prune
    >>> params = {"a": jnp.arange(1.0, 9.0).reshape(2, 4), "b": jnp.ones((2, 4))}
    >>> total = lambda p: float(jnp.sum(p["a"]) + 10 * jnp.sum(p["b"]))
    >>> report = optax_prune.sensitivity(params, total, [0.25, 0.5], higher_is_better=True)
    >>> report.losses
    {"['a']": (3.0, 10.0), "['b']": (20.0, 40.0)}
  """
  if higher_is_better not in (None, True, False):
    raise ValueError(
        f"`higher_is_better` must be None, True or False; got {higher_is_better!r}.")
  sign = -1.0 if higher_is_better else 1.0
  sparsities = tuple(_checks.fraction("sparsities", s) for s in sparsities)
  if not sparsities or list(sparsities) != sorted(sparsities):
    raise ValueError(f"`sparsities` must be a non-empty increasing sequence; got {sparsities}.")
  config = _config.make_config(0.5, where=where, granularity=granularity,
                               score=score, threshold=threshold, layer_axis=layer_axis)
  plan = _plan.make_plan(config, params)
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [leaf for _, leaf in path_leaves]
  baseline = float(evaluate(params))
  bar = _progress(progress, len(plan.pruned_indices) * len(sparsities))
  losses, sizes = {}, {}
  for group in (g for schedule in plan.schedules for g in schedule.groups):
    (leaf,) = group.leaves  # Layer scope: a group is one leaf.
    row = []
    for k, s in enumerate(sparsities):
      pruned = _pruned_leaf(leaves[leaf.index], jnp.float32(s), jnp.int32(leaf.index),
                            jnp.int32(k), granularity=leaf.granularity,
                            score=config.score, method=group.method, seed=config.seed)
      row.append(sign * (float(evaluate(treedef.unflatten(
          [pruned if j == leaf.index else x for j, x in enumerate(leaves)]))) - baseline))
      bar.update(1)
    losses[leaf.path] = tuple(row)
    sizes[leaf.path] = math.prod(leaf.shape)
  bar.close()
  falling = sum(row[-1] < row[0] for row in losses.values())
  if higher_is_better is None and losses and falling > len(losses) / 2:
    warnings.warn(
        f"`sensitivity`: in {falling} of {len(losses)} leaves `evaluate` falls as"
        " sparsity rises, as an accuracy does. It is read as a loss (lower is"
        " better), so `sparsities_for_budget` would prune the most sensitive"
        " leaves most. Pass `higher_is_better=True` for a metric where higher is"
        " better, or `higher_is_better=False` if it is a loss.", stacklevel=2)
  return SensitivityReport(baseline, sparsities, losses, sizes)


@functools.partial(jax.jit, static_argnames=("granularity", "score", "method", "seed"))
def _pruned_leaf(x, sparsity, index, count, *, granularity, score, method, seed):
  """``x`` with exactly ``round(s * units)`` units pruned to 0, as a mask
  update of ``magnitude_pruning`` ranks it at step ``count`` (its score's key
  from ``seed``, ``count`` and the leaf's ``index``). One compile per leaf
  shape and options, whatever the number of leaves."""
  key = _scores.leaf_key(_scores.step_key(seed, count), index)
  scores, sharding, units = _rules.leaf_scores(
      score, granularity, x, jnp.zeros_like(x), jnp.ones(x.shape, bool), key)
  sparsity = _distributions.clip_sparsity(sparsity)
  prune = (_distributions.prune_count(sparsity, [units[0].size] * units.shape[0])
           if isinstance(granularity, _granularity.PerLayer)  # Each layer its own count.
           else _distributions.prune_count(sparsity, units.size))
  (keep,), = _thresholds.keep_masks_for_counts([[units]], [prune], method)
  mask = _rules.expand(granularity, keep, scores, sharding)
  return jnp.where(mask, x, jnp.zeros((), x.dtype))


class _NoBar:
  def update(self, n):
    del n

  def close(self):
    pass


def _progress(show: bool, total: int):
  if not show:
    return _NoBar()
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc="sensitivity")


RULES = ("least_loss", "equal_loss")


def sparsities_for_budget(
    report: SensitivityReport, target: float, *, params: Optional[Any] = None,
    rule: str = "least_loss",
) -> Any:
  r"""Per-leaf sparsities meeting a total ``target`` at the least loss.

  Each leaf's measured curve (loss increase against its sparsity, 0 at 0,
  made non-decreasing, linear between points) gives the choice:

  * ``"least_loss"`` (default): the least total loss :math:`\sum_i L_i(s_i)`
    subject to :math:`\sum_i s_i n_i = T \sum_i n_i`, over the lower convex
    hull of each curve: segments are taken in increasing order of loss per
    pruned entry, :math:`\Delta L / (\Delta s \, n_i)`, the last one in part
    (the greedy solution of this convex problem). Large, insensitive leaves
    give most of the budget, as under a global magnitude ranking.
  * ``"equal_loss"``: PaddleSlim's ``get_ratios_by_loss``: every leaf the
    largest sparsity whose loss increase stays under one tolerance
    :math:`\tau`, the smallest :math:`\tau` that reaches the target (found
    by bisection; scaled down to it where leaves lose nothing). Blind to leaf
    sizes: a small leaf gives as much loss as a large one.

  Args:
    report: from :func:`sensitivity`.
    target: the pruned fraction of the analysed leaves' entries, in [0,
      largest measured sparsity] (sweep past the budget you need).
    params: optional; if given, the result is a pytree like ``params`` with
      a sparsity per analysed leaf and ``None`` elsewhere, usable as the
      ``schedule`` of :func:`magnitude_pruning` or the ``sparsity`` of
      :func:`prune`; otherwise a dict ``path -> sparsity``.
    rule: ``"least_loss"`` or ``"equal_loss"``.

  Returns:
    The per-leaf sparsities (floats, rounded down to 1e-6).

  Examples:
    >>> import optax_prune
    >>> report = optax_prune.SensitivityReport(
    ...     baseline=1.0, sparsities=(0.5, 0.9),
    ...     losses={"a": (0.0, 0.1), "b": (0.5, 2.0)}, sizes={"a": 100, "b": 100})
    >>> optax_prune.sparsities_for_budget(report, 0.5)
    {'a': 0.9, 'b': 0.1}
  """
  top = report.sparsities[-1]
  if not _checks.is_number(target) or not 0.0 <= target <= top:
    raise ValueError(f"`target` must be a number in [0, {top}] (the largest measured"
                     f" sparsity); got {target!r}.")
  _checks.one_of("rule", rule, RULES)
  paths = list(report.losses)
  sizes = np.array([report.sizes[p] for p in paths], float)
  xs = np.array((0.0,) + report.sparsities)
  # Worst loss so far: more sparsity never counts as cheaper (curves measured
  # one-shot are not always monotone).
  curves = [np.maximum.accumulate(np.array((0.0,) + report.losses[p], float)) for p in paths]
  allocate = _least_loss if rule == "least_loss" else _equal_loss
  chosen = allocate(xs, curves, sizes, target)
  chosen = [math.floor(s * 1e6) / 1e6 for s in chosen]
  if params is None:
    return dict(zip(paths, chosen))
  by_path = dict(zip(paths, chosen))
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  return treedef.unflatten([by_path.get(jax.tree_util.keystr(p)) for p, _ in path_leaves])


def lower_hull(xs: np.ndarray, ys: np.ndarray) -> list[int]:
  """Indices of the lower convex hull of the points (xs increasing)."""
  hull: list[int] = []
  for k in range(len(xs)):
    while len(hull) >= 2:
      a, b = hull[-2], hull[-1]
      # Drop b if it lies on or above the line from a to k.
      if (ys[b] - ys[a]) * (xs[k] - xs[a]) >= (ys[k] - ys[a]) * (xs[b] - xs[a]):
        hull.pop()
      else:
        break
    hull.append(k)
  return hull


def _least_loss(xs, curves, sizes, target) -> np.ndarray:
  segments = []  # (loss per entry, leaf, from x, to x)
  for i, ys in enumerate(curves):
    hull = lower_hull(xs, ys)
    for a, b in zip(hull, hull[1:]):
      per_entry = (ys[b] - ys[a]) / ((xs[b] - xs[a]) * sizes[i]) if sizes[i] else 0.0
      segments.append((per_entry, i, xs[a], xs[b]))
  chosen = np.zeros(len(curves))
  left = target * sizes.sum()  # Entries still to prune.
  # Cheapest first; per leaf the hull's slopes rise, so its segments come in order.
  for _, i, x0, x1 in sorted(segments, key=lambda g: (g[0], g[1], g[2])):
    if left <= 0:
      break
    if sizes[i] and left < (x1 - x0) * sizes[i]:
      chosen[i] = x0 + left / sizes[i]  # Part of this segment ends the budget.
      break
    chosen[i] = x1
    left -= (x1 - x0) * sizes[i]
  return chosen


def _equal_loss(xs, curves, sizes, target) -> np.ndarray:
  def allocate(tau):
    out = []
    for ys in curves:
      above = np.nonzero(ys > tau)[0]
      if not above.size:
        out.append(xs[-1])
        continue
      j = above[0]  # First point over the tolerance; j >= 1 when tau >= 0.
      x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
      out.append(x0 + (x1 - x0) * (tau - y0) / (y1 - y0) if j else 0.0)
    return np.array(out)

  fraction = lambda s: float(s @ sizes / sizes.sum()) if sizes.sum() else 0.0
  low, high = 0.0, max(float(ys.max()) for ys in curves)
  if fraction(allocate(low)) < target:
    for _ in range(100):
      mid = (low + high) / 2
      low, high = (mid, high) if fraction(allocate(mid)) < target else (low, mid)
    chosen = allocate(high)
  else:
    chosen = allocate(low)
  if fraction(chosen) > target:
    # Past the target at no loss (flat curves): scale down to it; smaller
    # sparsities never lose more.
    chosen = chosen * (target / fraction(chosen))
  return chosen
