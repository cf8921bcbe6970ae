"""The API reference builds from the docstrings, with warnings as errors."""

import pathlib
import re
import subprocess
import sys

import optax_prune

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"


def test_every_public_name_is_in_the_reference():
  index = (DOCS / "index.rst").read_text()
  documented = set(re.findall(r"auto(?:function|class):: optax_prune\.(\w+)", index))
  assert documented == set(optax_prune.__all__)


def test_the_reference_builds_without_warnings(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
       str(DOCS), str(tmp_path)],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  html = (tmp_path / "index.html").read_text()
  assert "magnitude_pruning" in html and "math notranslate" in html  # Formulas rendered.
