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

.PHONY: demo test bench venv ext clean gpu-data gpu-rehearsal sanitize fuzz

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

# the C++ extension (cem_fast._C); ninja rebuilds only what changed. Optional: without it the torch backend runs
# (CEM_FAST_BUILD_EXT=1 or CEM_FAST_CUDA=1 make a failed build fail make; see setup.py). The build's output is
# kept in build/ext-build.log; its configuration lines are printed, and on failure the log's last lines.
ext: $(VENV)/.ready
	@mkdir -p build; \
	if $(PY) setup.py -q build_ext --inplace > build/ext-build.log 2>&1 \
	    && ! grep -aq "^cem_fast build: FAILED" build/ext-build.log; then \
	  grep -a "^cem_fast build:" build/ext-build.log; \
	else \
	  grep -a "^cem_fast build:" build/ext-build.log; \
	  echo "note: cem_fast._C not built (without it the torch backend runs); build/ext-build.log ends:"; \
	  tail -n 20 build/ext-build.log | sed 's/^/  | /'; \
	  [ "$$CEM_FAST_BUILD_EXT" != 1 ] && [ "$$CEM_FAST_CUDA" != 1 ]; \
	fi

demo: ext
	$(VENV)/bin/cem-fast demo --out $(OUT)

# the whole-CEM, seam and field benchmarks at CI size first (about 3 minutes: they must keep running), then the
# tests (summary last)
test: ext
	CEM_FAST_BENCH_SIZE=ci $(PY) -m pytest -q -p no:cacheprovider benchmarks/test_bench_cem.py \
	  benchmarks/test_bench_seams.py benchmarks/test_bench_field.py --benchmark-only \
	  > .bench-ci.log 2>&1; rc=$$?; tail -1 .bench-ci.log; [ $$rc -eq 5 ] && rc=0; exit $$rc  # 5: skipped whole (no ../shared)
	$(PY) -m pytest -q

bench: ext
	$(PY) -m pytest -q benchmarks --benchmark-only

# the ops' C++ kernels under AddressSanitizer and UndefinedBehaviorSanitizer: built apart (build/asan, never over the
# installed cem_fast._C), loaded through CEM_FAST_EXTENSION with the ASan runtime preloaded (and libstdc++ with it:
# ASan intercepts C++ throws only when libstdc++ is there at its start); the op tests and a short fuzz run
# (FUZZ_EXAMPLES each; CI runs this after make test). Reports go to build/asan/report.* and are printed on failure
ASAN_LIB = build/asan/lib
FUZZ_EXAMPLES ?= 150
sanitize: $(VENV)/.ready
	@mkdir -p build/asan; \
	CEM_FAST_SANITIZE=1 CEM_FAST_BUILD_EXT=1 CEM_FAST_CUDA=0 $(PY) setup.py -q build_ext --build-lib $(ASAN_LIB) \
	  --build-temp build/asan/temp > build/asan/build.log 2>&1 || { tail -n 20 build/asan/build.log; exit 1; }
	@rm -f build/asan/report.*; \
	CEM_FAST_EXTENSION=$$(ls $(ASAN_LIB)/cem_fast/_C*.so) \
	  LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:log_path=$(CURDIR)/build/asan/report \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$(CURDIR)/build/asan/report \
	  CEM_FAST_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
	  $(PY) -m pytest -q -p no:cacheprovider tests/ops/test_intervene.py tests/ops/test_roi_sq_err.py \
	    tests/ops/test_op_checks.py tests/ops/test_fuzz.py \
	  || { echo "sanitizer reports:"; cat build/asan/report.* 2>/dev/null | head -n 60; exit 1; }

# the fuzz tests with a longer budget (examples per op and backend set)
fuzz: ext
	CEM_FAST_FUZZ_EXAMPLES=2000 $(PY) -m pytest -q -p no:cacheprovider tests/ops/test_fuzz.py

# benchmarks/gpu_check.sh run here on the CPU in a scratch copy with a scratch interpreter (everything but CUDA
# execution: install and build, compile checks, tests, benchmarks at CI size, profile, table); CI runs it
gpu-rehearsal: ext
	bash benchmarks/gpu_rehearsal.sh

# a copy of ../shared/data inside the repo (ignored), for the GPU machine, which receives the repo alone
gpu-data:
	rm -rf shared/data && mkdir -p shared && cp -r ../shared/data shared/data

clean:
	rm -rf $(VENV) build *.egg-info demo_out
