# The two commands a new user needs: `make quickstart` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.chattune-installed

.PHONY: setup test test-other-cpu test-slow quickstart lint

setup: $(STAMP)

# torch goes in first and pinned: a CPU build of 2.13.0 lies on disk here, while a bare `torch`
# requirement would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,serve,eval,web]'
	@# Debian packages, where root and apt allow (each is optional):
	@# tcmalloc: `chattune train` re-runs itself with it (a third less peak memory on CPU, see bench/);
	@# chromium + chromedriver: the web app's browser test drives them, and skips without them
	@missing=""; \
	ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || missing="libtcmalloc-minimal4"; \
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || missing="$$missing chromium chromium-driver"; \
	test -z "$$missing" || (apt-get update -qq && apt-get install -y -qq $$missing >/dev/null) || \
		echo "could not install $$missing: training keeps glibc malloc, the browser test skips"
	touch $(STAMP)

# lint first (ruff, the layer contract in pyproject.toml), then the suite
test: setup lint
	$(PY) -m pytest -q

# The suite as the other kind of CPU would run it: `precision: auto` picks bf16 as on an AVX-512-BF16/AMX CPU
# (or fp32 as on an AVX2-only one, when this machine has AMX); the kernels stay this machine's.
test-other-cpu: setup
	@if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then other=avx2; else other=amx; fi; \
	echo "emulating $$other"; $(PY) -m pytest -q --emulate-cpu $$other

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/lint-imports

quickstart: setup
	$(VENV)/bin/chattune model pull smollm2-135m-instruct
	$(VENV)/bin/chattune data check examples/quickstart.yaml -n 1
	$(VENV)/bin/chattune train examples/quickstart.yaml overwrite_output_dir=true
	$(VENV)/bin/chattune infer --model smollm2-135m-instruct --adapter runs/quickstart/final \
		--mode chat --input examples/quickstart/heldout.jsonl --compare-base --max-new-tokens 96
