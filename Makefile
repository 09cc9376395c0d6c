# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines pin torch to the local CPU wheel so that no dependency can pull a CUDA build.
# On a GPU machine: make install CONSTRAINTS=constraints/gpu.txt
CONSTRAINTS ?= constraints/cpu.txt
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=

export RAY_USAGE_STATS_ENABLED = 0
export HF_HUB_OFFLINE = 1
export MLFLOW_DISABLE_TELEMETRY = true
export AWS_EC2_METADATA_DISABLED = true
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install demo test test-fast bench bench-edit clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (about 2 minutes; log in $(VENV)/pip.log)"
	$(PY) -m pip install -q --upgrade pip > $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	$(PY) -m pip install -q "torch==2.13.0" -c $(CONSTRAINTS) >> $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	$(PY) -m pip install -q -e ".[test]" -c $(CONSTRAINTS) >> $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	$(PY) -c "import cfgen, torch, ray, diffusers, deepspeed, pydicom, highdicom, mlflow, moto; print('cfgen installed, torch', torch.__version__)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/cfgen demo --config $(CONFIG)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_decode.py

# the phantom editing benchmark from scratch: the instrument's phantoms and classifier, the benchmark's model
# (configs/phantom-bench.yaml), then every editing method against the truth (bench/RESULTS.md)
bench-edit: install
	$(PY) bench/bench_instrument.py
	$(VENV)/bin/cfgen train --config configs/phantom-bench.yaml
	$(PY) bench/bench_edit.py --config configs/phantom-bench.yaml --run runs/phantom-bench --n 32 --steps 20

clean:
	rm -rf $(VENV) runs bench/out *.egg-info
