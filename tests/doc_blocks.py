"""Runs the Python code blocks of a Markdown document, in order, in one namespace.

Every ```` ```python ```` block of the README and of ``docs/guides/*.md`` is run
by the suite (``tests/test_guides.py``). The blocks of one file share a
namespace, as a notebook's cells do, so a guide can build a model once and use
it further down; blocks indented inside a list item are dedented.
``python -m tests.doc_blocks FILE`` runs one file (the sharding guide runs this
way on 8 faked CPU devices).
"""

import pathlib
import re
import sys
import textwrap

_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


def blocks(path) -> list[str]:
  """The Python code blocks of the Markdown file at ``path``."""
  text = pathlib.Path(path).read_text()
  return [textwrap.dedent(code) for _, code in _BLOCK.findall(text)]


def run(path, after=None) -> dict:
  """Runs the blocks of ``path`` in one namespace and returns it.

  ``after(code, scope)``, if given, is called after each block (the suite's
  checks of what a block computed).
  """
  path = pathlib.Path(path)
  scope = {"__name__": f"guide_{path.stem}"}
  for number, code in enumerate(blocks(path), 1):
    exec(compile(code, f"{path.name}, code block {number}", "exec"), scope)  # pylint: disable=exec-used
    if after is not None:
      after(code, scope)
  return scope


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit(__doc__)
  run(sys.argv[1])
  print("ok")
