# Two commands on a fresh machine: `make demo` (the default DAG) and `make test` (the test suite).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CORES  ?= 2
# pytest worker processes (pytest-xdist); each test file runs whole on one worker, so a module fixture
# is built once (a session fixture once per worker that uses it)
TEST_WORKERS ?= $(CORES)
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

.PHONY: demo results-page test test-fast install clean-results

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build of torch first (pinned here only; pyproject keeps a range for CUDA users)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) --configfile config/config.yaml
	$(MAKE) results-page

# docs/results/lensing.md from the calibration summaries of the last run (figures and JSON copied beside it)
results-page: $(STAMP)
	$(PY) -m pipeline report --calibration results/calibration --out docs/results/lensing.md \
		--results-page --command "make demo" --title "Lensing calibration (make demo)"

test: $(STAMP)
	$(PYTEST) tests

# the fast tier (no test marked slow): a quick check while developing; `make test` runs everything
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

clean-results:
	rm -rf results logs benchmarks
