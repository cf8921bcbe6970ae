"""The guides and the API reference build, with warnings as errors."""

import pathlib
import re
import subprocess
import sys

import optax_prune

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"


def test_every_public_name_is_in_the_reference():
  reference = (DOCS / "api.rst").read_text()
  documented = set(re.findall(r"auto(?:function|class):: optax_prune\.(\w+)", reference))
  assert documented == set(optax_prune.__all__)


def test_the_reference_builds_without_warnings(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
       str(DOCS), str(tmp_path)],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  html = (tmp_path / "api.html").read_text()
  assert "magnitude_pruning" in html and "math notranslate" in html  # Formulas rendered.
  index = (tmp_path / "index.html").read_text()
  for guide in sorted((DOCS / "guides").glob("*.md")):  # Every guide is in the table of contents.
    assert f'href="guides/{guide.stem}.html"' in index, guide.name
    assert (tmp_path / "guides" / f"{guide.stem}.html").exists(), guide.name
