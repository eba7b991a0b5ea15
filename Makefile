# Two commands: `make demo` and `make test`. Each first creates .venv when it is missing.
# On a CPU machine torch is pinned to 2.13.0 (a CPU build); never let pip pull a CUDA torch here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Triton: the venv's runs the kernels under the interpreter in the tests (3.6's interpreter fails on numpy 2); the GPU
# machine's (GPU.md: 3.6.0 beside torch 2.11) lies beside it for the sm_90 compile check, so drift shows up here
TRITON_SPEC ?= triton==3.9.0
GPU_TRITON_SPEC ?= triton==3.6.0
OUT ?= demo_out

.PHONY: demo test bench venv ext clean gpu-data gpu-rehearsal

$(VENV)/.ready: pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q numpy Pillow PyYAML matplotlib tqdm scipy pytest pytest-benchmark hypothesis setuptools wheel ninja pybind11
	$(PY) -m pip install -q "$(TRITON_SPEC)" || echo "note: triton not installed; the triton backend is skipped"
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/triton-gpu-image "$(GPU_TRITON_SPEC)" \
	  || echo "note: the GPU image's triton is not installed; its compile check is skipped"
	$(PY) -m pip install -q --no-deps "captum==0.9.*" || echo "note: captum not installed; the Captum adapter tests are skipped"
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
	  > .bench-ci.log 2>&1; rc=$$?; tail -1 .bench-ci.log; [ $$rc -eq 5 ] && rc=0; exit $$rc  # 5: skipped whole (no ../shared)
	$(PY) -m pytest -q

bench: ext
	$(PY) -m pytest -q benchmarks --benchmark-only

# benchmarks/gpu_check.sh run here on the CPU in a scratch copy with a scratch interpreter (everything but CUDA
# execution: install and build, compile checks, tests, benchmarks at CI size, profile, table); CI runs it
gpu-rehearsal: ext
	bash benchmarks/gpu_rehearsal.sh

# a copy of ../shared/data inside the repo (ignored), for the GPU machine, which receives the repo alone
gpu-data:
	rm -rf shared/data && mkdir -p shared && cp -r ../shared/data shared/data

clean:
	rm -rf $(VENV) build *.egg-info demo_out
