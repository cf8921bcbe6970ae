"""Plain-text tables: the one formatter behind every printed summary."""

from __future__ import annotations

from typing import Sequence


def format_table(
    header: Sequence[str],
    body: Sequence[Sequence[str]],
    footer: Sequence[Sequence[str]] = (),
    *,
    left: int = 0,
) -> str:
  """Rows of string cells as aligned text columns.

  Every column is as wide as its widest cell; the first ``left`` columns are
  left-aligned (names, shapes), the others right-aligned (numbers). A rule of
  dashes follows the header and, when there is a footer (totals), precedes it.

  Args:
    header: the column titles.
    body: the rows.
    footer: rows set apart below a rule, such as totals.
    left: how many leading columns are left-aligned.

  Returns:
    The table, lines joined by newlines.

  Examples:
    >>> print(format_table(("name", "n"), [("a", "1"), ("bb", "22")], left=1))
    name   n
    ----  --
    a      1
    bb    22
  """
  rows = [tuple(map(str, r)) for r in (header, *body, *footer)]
  widths = [max(len(c) for c in column) for column in zip(*rows)]
  fmt = lambda cells: "  ".join(
      c.ljust(w) if i < left else c.rjust(w)
      for i, (c, w) in enumerate(zip(cells, widths))
  ).rstrip()
  rule = "  ".join("-" * w for w in widths)
  lines = [fmt(rows[0]), rule] + [fmt(r) for r in rows[1:1 + len(body)]]
  if footer:
    lines += [rule] + [fmt(r) for r in rows[1 + len(body):]]
  return "\n".join(lines)
