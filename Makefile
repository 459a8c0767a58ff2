# infergate: `make demo` runs Triton on CPU + the gateway + traffic; `make test` runs every test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install triton-install prometheus-install triton-up triton-down gateway-up gateway-down demo demo-down test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)             ## the gateway and its test tools in .venv

triton-install:               ## Triton on CPU (nvidia-pytriton wheel) in .venv-triton
	scripts/triton-cpu.sh install

prometheus-install:           ## Prometheus + promtool (Debian package; needs root or sudo) for the dashboard and alert tests
	scripts/prometheus.sh install

triton-up:                    ## Triton with the example models on 8000 HTTP, 8001 gRPC, 8002 metrics
	scripts/triton-cpu.sh start

triton-down:
	scripts/triton-cpu.sh stop

gateway-up: install           ## the gateway on 9000 HTTP, 9001 gRPC, 9002 admin/metrics
	scripts/gateway.sh start

gateway-down:
	scripts/gateway.sh stop

demo: install triton-up gateway-up   ## everything running, then real traffic through the gateway
	$(PY) scripts/demo.py

demo-down: gateway-down triton-down

test: install triton-install  ## unit + integration tests (starts its own Triton and gateways)
	$(PY) -m pytest -q

bench: install triton-install  ## perf_analyzer direct vs through the gateway; appends to bench/RESULTS.md
	$(PY) bench/run.py

clean: demo-down
	rm -rf $(VENV) .venv-triton .triton .run
