PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test schedules-plot notebooks clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m benchmarks.demo_digits

test: $(STAMP)
	# Two workers: the suite is mostly compilation, one core each.
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 optax_prune tests

schedules-plot: $(STAMP)
	$(PY) scripts/plot_schedules.py

notebooks: $(STAMP)
	$(PY) scripts/run_notebooks.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
