# Two commands: `make demo` and `make test`. Each first creates .venv when it is missing.
# On a CPU machine torch is pinned to 2.13.0 (a CPU build); never let pip pull a CUDA torch here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
OUT ?= demo_out

.PHONY: demo test bench venv clean

$(VENV)/.ready: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q numpy Pillow PyYAML matplotlib tqdm scipy pytest pytest-benchmark hypothesis setuptools wheel
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

venv: $(VENV)/.ready

demo: $(VENV)/.ready
	$(VENV)/bin/cem-fast demo --out $(OUT)

test: $(VENV)/.ready
	$(PY) -m pytest -q

bench: $(VENV)/.ready
	$(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info demo_out
