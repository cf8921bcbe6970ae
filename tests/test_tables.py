"""The one table formatter: columns as wide as their widest cell (footer
included), `left` columns left-aligned, rules under the header and above the
footer, no trailing spaces."""

from optax_prune._tables import format_table


def test_columns_fit_every_cell_and_rules_frame_the_footer():
  text = format_table(("path", "size", "kind"), [("w", "4", "x"), ("bias", "12", "yy")],
                      [("total", "16", "")], left=1)
  assert text.splitlines() == [
      "path   size  kind",
      "-----  ----  ----",
      "w         4     x",
      "bias     12    yy",
      "-----  ----  ----",
      "total    16",
  ]


def test_without_a_footer_there_is_one_rule():
  text = format_table(("a", "b"), [("xx", "y")], left=2)
  assert text.splitlines() == ["a   b", "--  -", "xx  y"]
