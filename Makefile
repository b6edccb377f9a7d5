# evergreen — the two commands: `make demo` and `make test`.
# Both create .venv on first use and install everything into it.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel on these machines; on a GPU host e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export GX_ANALYTICS_ENABLED ?= false
export MLFLOW_ENABLE_TELEMETRY ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: demo test test-unit test-integration lint typecheck format bench bench-growth install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev,text]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/evergreen demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"
	$(BIN)/python -m pytest -q -m integration

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -m integration

lint: $(STAMP) typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy continual data_plane model_registry

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-growth: $(STAMP)
	nice -n 10 $(BIN)/python -m benchmarks.bench_growth --cycles $(or $(CYCLES),100)

clean:
	rm -rf .evergreen .pytest_cache
