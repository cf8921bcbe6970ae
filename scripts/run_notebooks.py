"""Runs the notebooks top to bottom and stores them with their outputs.

Run as ``python scripts/run_notebooks.py`` (``make notebooks``) after changing a
notebook or the results it reads, so that a viewer (GitHub, nbviewer) shows the
tables and plots without running anything. ``make test`` checks that the stored
notebooks carry outputs and that they still run.
"""

import pathlib
import sys

import nbclient
import nbformat

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def main(names):
  for path in sorted(NOTEBOOKS.glob("*.ipynb")):
    if names and path.name not in names:
      continue
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    nbformat.write(notebook, path)
    print(f"stored {path.name} with outputs", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
