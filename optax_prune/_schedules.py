"""Sparsity schedules: pure functions of a (traced) step.

A pruning schedule is any callable ``schedule(step) -> PruningTarget`` where
``step`` is an int32 scalar (possibly traced inside ``jax.jit``) and the result
holds two scalars:

* ``sparsity``: float32 in [0, 1], the fraction of entries to prune;
* ``update``: bool, whether the masks are recomputed at this step.

Schedules must not branch in Python on ``step``: they use ``jnp.where`` and
clipping, so one compiled train step serves the whole run.

The built-in schedules are frozen dataclasses, equal when their arguments are:
leaves whose schedules are equal share a group (one global ranking, one ERK
budget), whichever call built them. A plain number ``s`` means
``constant_schedule(s)``, so equal numbers share a group too. Schedules of
your own compare as Python compares them: a function only to itself.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp

from optax_prune import _checks


class PruningTarget(NamedTuple):
  """What a schedule says about one step."""

  sparsity: jax.Array  # float32 scalar in [0, 1]: fraction of entries pruned.
  update: jax.Array  # bool scalar: recompute the masks at this step.


class PruningSchedule(Protocol):
  """The schedule protocol: ``schedule(step) -> PruningTarget``."""

  def __call__(self, step: jax.Array) -> PruningTarget:
    ...


def _int32(name: str, value: Any, minimum: int) -> int:
  return _checks.integer(name, value, minimum, _checks.INT32_MAX)


def log_schedule(
    sparsity_upper_bound: float,
    interval_pass: int = 3,
    end_pass: int = 60,
    *,
    steps_per_epoch: int,
) -> PruningSchedule:
  r"""The original dynamic pruning schedule: cut hard early, gently late.

  Masks are recomputed at the first step of every epoch (pass) ``e`` with
  ``e % interval_pass == 0`` and ``e <= end_pass``, and also at epoch
  ``end_pass`` itself, so the upper bound is reached exactly. The sparsity set
  at such an epoch is

  .. math::

    s(e) = s_{\max} \frac{\log(2 + e / I)}{\log(2 + E / I)},

  with :math:`I` = ``interval_pass`` and :math:`E` = ``end_pass``. Between
  updates it holds the last value; after ``end_pass`` it stays at
  :math:`s_{\max}`. Note that epoch 0 already prunes
  :math:`s_{\max} \log 2 / \log(2 + E/I)`.

  Args:
    sparsity_upper_bound: final sparsity :math:`s_{\max}`, in [0, 1].
    interval_pass: epochs between mask updates, >= 1.
    end_pass: last epoch that raises the sparsity, >= 0.
    steps_per_epoch: optimizer steps per epoch, >= 1.

  Returns:
    A schedule ``step -> PruningTarget``.

  Examples:
    >>> import optax_prune
    >>> schedule = optax_prune.log_schedule(0.9, 1, 2, steps_per_epoch=10)
    >>> [round(float(schedule(s).sparsity), 4) for s in (0, 9, 10, 20, 99)]
    [0.45, 0.45, 0.7132, 0.9, 0.9]
    >>> [bool(schedule(s).update) for s in (0, 1, 10, 20, 30)]
    [True, False, True, True, False]

  References:
    PaddlePaddle, dynamic pruning hook (``sparsity_upper_bound``,
    ``interval_pass``, ``end_pass``).
  """
  return LogSchedule(
      _checks.fraction("sparsity_upper_bound", sparsity_upper_bound),
      _int32("interval_pass", interval_pass, 1),
      _int32("end_pass", end_pass, 0),
      _int32("steps_per_epoch", steps_per_epoch, 1),
  )


@dataclasses.dataclass(frozen=True)
class LogSchedule:
  """:func:`log_schedule` as a value: equal arguments, equal schedules."""

  sparsity_upper_bound: float
  interval_pass: int
  end_pass: int
  steps_per_epoch: int

  def __call__(self, step) -> PruningTarget:
    upper, interval = self.sparsity_upper_bound, self.interval_pass
    end, per_epoch = self.end_pass, self.steps_per_epoch
    denominator = math.log(2.0 + end / interval)
    step = jnp.asarray(step, jnp.int32)
    epoch = step // per_epoch
    # The epoch whose value is in force: the last update epoch <= `epoch`.
    last = jnp.minimum((epoch // interval) * interval, end)
    last = jnp.where(epoch >= end, end, last)
    ratio = jnp.log(2.0 + last.astype(jnp.float32) / interval) / denominator
    sparsity = jnp.where(epoch >= end, upper, upper * ratio)
    on_boundary = step % per_epoch == 0
    update_epoch = ((epoch % interval) == 0) & (epoch <= end) | (epoch == end)
    return PruningTarget(
        jnp.asarray(sparsity, jnp.float32), on_boundary & update_epoch
    )


def polynomial_schedule(
    final_sparsity: float,
    *,
    begin_step: int,
    end_step: int,
    frequency: int,
    initial_sparsity: float = 0.0,
    power: float = 3.0,
) -> PruningSchedule:
  r"""Zhu & Gupta's polynomial (by default cubic) gradual pruning schedule.

  Masks are recomputed at steps ``begin_step + j * frequency`` up to
  ``end_step``, and at ``end_step`` itself even when ``end_step - begin_step``
  is not a multiple of ``frequency``. At such a step :math:`t`

  .. math::

    s(t) = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{t_1 - t_0}\right)^p,

  held until the next update; before ``begin_step`` the sparsity is 0 and after
  ``end_step`` it stays at :math:`s_f`.

  Args:
    final_sparsity: :math:`s_f`, in [0, 1].
    begin_step: :math:`t_0`, first pruning step, >= 0.
    end_step: :math:`t_1`, step at which ``final_sparsity`` is reached,
      >= ``begin_step``.
    frequency: steps between mask updates, >= 1.
    initial_sparsity: :math:`s_i`, in [0, 1], applied at ``begin_step``.
    power: :math:`p`, > 0 (3 in the paper).

  Returns:
    A schedule ``step -> PruningTarget``.

  Examples:
    >>> import optax_prune
    >>> schedule = optax_prune.polynomial_schedule(
    ...     0.8, begin_step=10, end_step=25, frequency=10)
    >>> [round(float(schedule(s).sparsity), 4) for s in (0, 10, 19, 20, 25)]
    [0.0, 0.0, 0.0, 0.7704, 0.8]
    >>> [bool(schedule(s).update) for s in (9, 10, 20, 25, 30)]
    [False, True, True, True, False]

  References:
    Zhu & Gupta, `To prune, or not to prune
    <https://arxiv.org/abs/1710.01878>`_, 2017.
  """
  final = _checks.fraction("final_sparsity", final_sparsity)
  initial = _checks.fraction("initial_sparsity", initial_sparsity)
  begin = _int32("begin_step", begin_step, 0)
  end = _int32("end_step", end_step, 0)
  freq = _int32("frequency", frequency, 1)
  if begin > end:
    raise ValueError(
        f"`begin_step` must be <= `end_step`; got begin_step={begin},"
        f" end_step={end}."
    )
  power = _checks.positive_number("power", power)
  return PolynomialSchedule(final, begin, end, freq, initial, power)


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule:
  """:func:`polynomial_schedule` as a value: equal arguments, equal schedules."""

  final_sparsity: float
  begin_step: int
  end_step: int
  frequency: int
  initial_sparsity: float
  power: float

  def __call__(self, step) -> PruningTarget:
    final, initial, power = self.final_sparsity, self.initial_sparsity, self.power
    begin, end, freq = self.begin_step, self.end_step, self.frequency
    span = max(end - begin, 1)
    step = jnp.asarray(step, jnp.int32)
    # The update step whose value is in force: the last one <= `step`.
    offset = jnp.clip(step - begin, 0, end - begin)
    last = jnp.where(step >= end, end - begin, (offset // freq) * freq)
    progress = last.astype(jnp.float32) / span
    sparsity = final + (initial - final) * (1.0 - progress) ** power
    sparsity = jnp.where(step >= end, final, sparsity)
    sparsity = jnp.where(step < begin, 0.0, sparsity)
    in_range = (step >= begin) & (step <= end)
    update = in_range & (((step - begin) % freq == 0) | (step == end))
    return PruningTarget(jnp.asarray(sparsity, jnp.float32), update)


def constant_schedule(sparsity: float, *, step: int = 0) -> PruningSchedule:
  """The original static pruning: prune once at ``step``, then keep the masks.

  Before ``step`` nothing is pruned; at ``step`` the masks are computed once
  for ``sparsity`` and stay fixed while training goes on (fine-tuning).

  Args:
    sparsity: fraction pruned, in [0, 1] (the static hook's ``sparsity_ratio``).
    step: the step at which to prune, >= 0.

  Returns:
    A schedule ``step -> PruningTarget``.

  Examples:
    >>> import optax_prune
    >>> schedule = optax_prune.constant_schedule(0.5, step=3)
    >>> [float(schedule(s).sparsity) for s in (0, 3, 100)]
    [0.0, 0.5, 0.5]
    >>> [bool(schedule(s).update) for s in (0, 3, 4)]
    [False, True, False]
  """
  return ConstantSchedule(
      _checks.fraction("sparsity", sparsity), _int32("step", step, 0))


@dataclasses.dataclass(frozen=True)
class ConstantSchedule:
  """:func:`constant_schedule` as a value: equal arguments, equal schedules."""

  sparsity: float
  step: int

  def __call__(self, count) -> PruningTarget:
    count = jnp.asarray(count, jnp.int32)
    return PruningTarget(
        jnp.where(count >= self.step, jnp.float32(self.sparsity), jnp.float32(0.0)),
        count == self.step,
    )


def from_optax_schedule(
    sparsity: Callable[[jax.Array], jax.Array], *, every: int, begin_step: int = 0
) -> PruningSchedule:
  """A pruning schedule from an optax-style schedule of the sparsity.

  ``sparsity(step)`` is any function of the step returning a float, such as
  ``optax.linear_schedule(0.0, 0.9, 1000)``; masks are recomputed at steps
  ``begin_step + j * every`` with the value it gives there (clipped to [0, 1]).

  Args:
    sparsity: ``step -> float``, traced like the step.
    every: steps between mask updates, >= 1.
    begin_step: the first mask update, >= 0.

  Returns:
    A schedule ``step -> PruningTarget``.

  Examples:
    >>> import optax, optax_prune
    >>> schedule = optax_prune.from_optax_schedule(
    ...     optax.linear_schedule(0.0, 0.8, 100), every=50)
    >>> [(round(float(schedule(s).sparsity), 4), bool(schedule(s).update))
    ...  for s in (0, 50, 60, 100)]
    [(0.0, True), (0.4, True), (0.48, False), (0.8, True)]
  """
  if not callable(sparsity):
    raise ValueError(f"`sparsity` must be a function of the step; got {sparsity!r}.")
  return OptaxSchedule(sparsity, _int32("every", every, 1), _int32("begin_step", begin_step, 0))


@dataclasses.dataclass(frozen=True)
class OptaxSchedule:
  """:func:`from_optax_schedule` as a value."""

  sparsity: Callable[[jax.Array], jax.Array]
  every: int
  begin_step: int

  def __call__(self, step) -> PruningTarget:
    step = jnp.asarray(step, jnp.int32)
    value = jnp.asarray(self.sparsity(step), jnp.float32)
    update = (step >= self.begin_step) & ((step - self.begin_step) % self.every == 0)
    return PruningTarget(jnp.clip(value, 0.0, 1.0), update)


def final_sparsity(schedule: Any) -> Optional[float]:
  """The sparsity a built-in schedule ends at (None for a callable of your own)."""
  for field in ("final_sparsity", "sparsity_upper_bound", "sparsity"):
    value = getattr(schedule, field, None)
    if _checks.is_number(value):
      return float(value)
  return None


def check_schedule(name: str, schedule: Any) -> Callable[[Any], PruningTarget]:
  """Checks a schedule by tracing it once abstractly; returns it as a callable.

  A plain number is taken as ``constant_schedule(number)``.
  """
  if _checks.is_number(schedule):
    return constant_schedule(_checks.fraction(name, schedule))
  if not callable(schedule):
    raise ValueError(
        f"`{name}` must be a schedule (a callable `step -> PruningTarget`, such"
        f" as `optax_prune.log_schedule(...)`) or a sparsity in [0, 1]; got"
        f" {schedule!r}."
    )
  try:
    out = jax.eval_shape(schedule, jax.ShapeDtypeStruct((), jnp.int32))
  except Exception as e:  # Any failure here is the schedule's, not ours.
    raise ValueError(
        f"`{name}` could not be evaluated on an int32 step: {e}"
    ) from e
  ok = (
      isinstance(out, tuple)
      and len(out) == 2
      and out[0].shape == ()
      and jnp.issubdtype(out[0].dtype, jnp.floating)
      and out[1].shape == ()
      and out[1].dtype == jnp.bool_
  )
  if not ok:
    hint = ""
    if hasattr(out, "shape") and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating):
      hint = (" It returned one float, like an optax schedule: wrap it as"
              f" `optax_prune.from_optax_schedule({name}, every=100)` to update"
              " the masks every 100 steps.")
    raise ValueError(
        f"`{name}` must return a pair (sparsity: float scalar, update: bool"
        f" scalar), such as `optax_prune.PruningTarget`; it returned {out!r}.{hint}"
    )
  return schedule
