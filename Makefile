# Two commands: `make demo` and `make test`. Each first creates .venv when it is missing.
# On a CPU machine torch is pinned to 2.13.0 (a CPU build); never let pip pull a CUDA torch here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
OUT ?= demo_out

.PHONY: demo test bench venv ext clean gpu-data

$(VENV)/.ready: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q numpy Pillow PyYAML matplotlib tqdm scipy pytest pytest-benchmark hypothesis setuptools wheel ninja pybind11
	$(PY) -m pip install -q triton || echo "note: triton not installed; the triton backend is skipped"
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

venv: $(VENV)/.ready

# the C++ extension (cem_fast._C); ninja rebuilds only what changed. Optional: without it the torch backend runs.
ext: $(VENV)/.ready
	$(PY) setup.py -q build_ext --inplace > /dev/null 2>&1 || echo "note: cem_fast._C not built; using the torch backend"

demo: ext
	$(VENV)/bin/cem-fast demo --out $(OUT)

# the whole-CEM benchmarks at CI size first (about 30 s: they must keep running), then the tests (summary last)
test: ext
	CEM_FAST_BENCH_SIZE=ci $(PY) -m pytest -q -p no:cacheprovider benchmarks/test_bench_cem.py --benchmark-only \
	  > .bench-ci.log 2>&1; rc=$$?; tail -1 .bench-ci.log; exit $$rc
	$(PY) -m pytest -q

bench: ext
	$(PY) -m pytest -q benchmarks --benchmark-only

# a copy of ../shared/data inside the repo (ignored), for the GPU machine, which receives the repo alone
gpu-data:
	rm -rf shared/data && mkdir -p shared && cp -r ../shared/data shared/data

clean:
	rm -rf $(VENV) build *.egg-info demo_out
