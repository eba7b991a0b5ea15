"""The logic of setup.py, importable without building anything (tests/test_install.py calls these functions).

``cem_fast._C`` is the C++ extension that registers the ``torch.ops.cem_fast`` operators: CPU kernels with OpenMP,
plus the CUDA kernels of csrc/*.cu when torch has CUDA, a toolkit is found and there is something to compile
them for. Two environment switches, each ``auto`` (the default), ``0`` or ``1``:

* ``CEM_FAST_BUILD_EXT``: ``auto`` builds the extension when torch is importable and goes on without it when the
  build fails, whatever the error (cem_fast then runs on the torch backend and ``cem-fast info`` says why); ``0``
  never builds it; ``1`` must build it: a failure of the CPU extension fails the install (a failure of the CUDA
  half, unless ``CEM_FAST_CUDA=1``, falls back to the CPU kernels).
* ``CEM_FAST_CUDA``: ``auto`` adds the CUDA kernels when torch has CUDA, a toolkit is found and a GPU is visible
  or ``TORCH_CUDA_ARCH_LIST`` names the GPUs to compile for; when building them fails (any error: torch's own
  ``_get_cuda_arch_flags``, nvcc, the toolkit's version), the CPU-only extension is built instead. ``0`` builds
  the CPU kernels only; ``1`` must build the CUDA kernels: a CPU torch, a missing toolkit, nothing to compile for
  or a failed build fails the install.

Every decision is printed as one ``cem_fast build: ...`` line (flushed), and so is the progress of the build.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Callable, Mapping, Optional

ROOT = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join(ROOT, "build", "generated")  # cem_fast_build_info.h, included by csrc/bindings.cpp
OPENMP = ["-fopenmp"]  # compile and link: without it at::parallel_for silently runs on one thread
SWITCHES = ("CEM_FAST_BUILD_EXT", "CEM_FAST_CUDA")


def say(message: str) -> None:
    print(f"cem_fast build: {message}", flush=True)


def _env(env: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    return os.environ if env is None else env


def switch(name: str, env: Optional[Mapping[str, str]] = None) -> str:
    value = _env(env).get(name, "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        sys.exit(f"cem_fast build: {name} must be auto, 0 or 1, got {value!r}")
    return value


def sanitizer_flags(env: Optional[Mapping[str, str]] = None) -> list[str]:
    """CEM_FAST_SANITIZE=1: AddressSanitizer and UndefinedBehaviorSanitizer in the C++ kernels (``make sanitize``
    builds them apart and runs the op and fuzz tests with the ASan runtime preloaded). -fno-wrapv undoes Python's
    -fwrapv, so that a signed overflow is reported instead of defined to wrap."""
    if switch("CEM_FAST_SANITIZE", env) != "1":
        return []
    say("sanitizers on (CEM_FAST_SANITIZE=1): -fsanitize=address,undefined, -O1 -g")
    return ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-fno-wrapv"]


def visible_gpus(torch) -> int:
    """torch.cuda.device_count(), 0 where it fails (a CUDA torch without a driver)."""
    try:
        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no driver, no device: nothing to compile for
        return 0


def cuda_choice(torch, cuda_home, env: Optional[Mapping[str, str]] = None,
                gpus: Optional[int] = None) -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why; CEM_FAST_CUDA=1 that cannot be honoured stops the build.

    Without a visible GPU (``gpus``: torch.cuda.device_count() at build time) and without TORCH_CUDA_ARCH_LIST,
    torch does not know what to compile for (its ``_get_cuda_arch_flags`` fails with an IndexError), so the CUDA
    kernels are left out unless CEM_FAST_CUDA=1, which then stops with how to say what to compile for."""
    env = _env(env)
    wanted = switch("CEM_FAST_CUDA", env)
    if wanted == "0":
        return False, "no (CEM_FAST_CUDA=0)"
    missing = (f"torch {torch.__version__} is a CPU build" if not torch.version.cuda else
               "no CUDA toolkit found (set CUDA_HOME)" if not cuda_home else None)
    if missing and wanted == "1":
        sys.exit(f"cem_fast build: CEM_FAST_CUDA=1 but {missing}")
    if missing:
        return False, f"no ({missing})"
    arch_list = env.get("TORCH_CUDA_ARCH_LIST", "").strip()
    gpus = visible_gpus(torch) if gpus is None else gpus
    if gpus == 0 and arch_list in ("", "native"):
        nothing = "no GPU is visible (torch.cuda.device_count() == 0) and TORCH_CUDA_ARCH_LIST is not set"
        if wanted == "1":
            sys.exit(f"cem_fast build: CEM_FAST_CUDA=1 but {nothing}: set TORCH_CUDA_ARCH_LIST to the compute "
                     "capabilities to compile for (e.g. TORCH_CUDA_ARCH_LIST=\"8.0;9.0\")")
        return False, (f"no ({nothing}; set it, e.g. TORCH_CUDA_ARCH_LIST=\"8.0;9.0\", or CEM_FAST_CUDA=1 with "
                       "it, to build them)")
    target = f"TORCH_CUDA_ARCH_LIST={arch_list}" if arch_list not in ("", "native") else f"{gpus} visible GPU(s)"
    return True, f"yes (torch CUDA {torch.version.cuda}, toolkit {cuda_home}, for {target})"


def attempts(with_cuda: bool, env: Optional[Mapping[str, str]] = None) -> list[tuple[str, bool]]:
    """What to try to build, in order, as (``"cuda"`` or ``"cpu"``, whether its failure fails the install).

    CUDA kernels that are not required fall back to the CPU-only extension; the CPU-only extension's failure fails
    the install only when a switch is 1 (CEM_FAST_CUDA=1 allows no fallback: the CUDA build is the only try)."""
    ext, cuda = switch("CEM_FAST_BUILD_EXT", env), switch("CEM_FAST_CUDA", env)
    if with_cuda and cuda == "1":
        return [("cuda", True)]
    required = "1" in (ext, cuda)
    return ([("cuda", False)] if with_cuda else []) + [("cpu", required)]


def _why(e: BaseException) -> str:
    last = (str(e).strip().splitlines() or [""])[-1]
    return f"{type(e).__name__}: {last}" if last else type(e).__name__


def first_that_builds(tries: list[tuple[str, bool]], build: Callable[[str], None],
                      say: Callable[[str], None] = say) -> Optional[str]:
    """Call ``build(kind)`` for each of ``tries`` (from :func:`attempts`) until one returns; returns its kind, or
    None when none built. Any exception counts as a failure, not only a compiler error (setuptools' ``optional``
    catches those alone): one line says what was skipped and why, and a required part re-raises."""
    for i, (kind, fatal) in enumerate(tries):
        try:
            build(kind)
            return kind
        except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure of an optional part falls back
            if isinstance(e, SystemExit) and fatal:
                raise
            why = _why(e)
            if fatal:
                forced = "CEM_FAST_CUDA=1" if kind == "cuda" else "CEM_FAST_BUILD_EXT or CEM_FAST_CUDA is 1"
                say(f"FAILED to build cem_fast._C ({'CUDA' if kind == 'cuda' else 'CPU'} kernels): {why}; {forced}, "
                    "so the install fails")
                raise
            if i + 1 < len(tries):
                say(f"CUDA kernels skipped: building them failed ({why}); building the CPU kernels only "
                    "(CEM_FAST_CUDA=1 makes this fail the install)")
            else:
                say(f"FAILED to build cem_fast._C ({'CUDA' if kind == 'cuda' else 'CPU'} kernels): {why}; extension "
                    "skipped: cem_fast runs on the torch backend (CEM_FAST_BUILD_EXT=1 makes this fail the install)")
    return None


def write_if_changed(path: str, text: str) -> None:
    """Rewritten only when it changes: ninja would otherwise recompile what includes it on every build."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def build_record(torch, with_cuda: bool) -> dict:
    """What the extension is built against; compared with the running torch when cem_fast._C is imported."""
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda or "", "cuda_kernels": with_cuda}


def write_build_header(record: dict) -> None:
    write_if_changed(os.path.join(GENERATED, "cem_fast_build_info.h"),
                     "// generated by setup.py: the torch cem_fast._C is built against\n"
                     f"#define CEM_FAST_BUILD_TORCH {json.dumps(record['torch'])}\n"
                     f"#define CEM_FAST_BUILD_TORCH_CUDA {json.dumps(record['torch_cuda'])}\n")


def sources(kind: str) -> list[str]:
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    return cpp + (sorted(glob.glob(os.path.join("csrc", "*.cu"))) if kind == "cuda" else [])


def make_extension(kind: str, cpp_extension, sanitize: list[str]):
    """The extension for ``kind`` ("cuda": C++ and CUDA kernels; "cpu": C++ only). Built lazily: CUDAExtension
    itself fails without a toolkit, and that failure falls back like any other."""
    common = dict(include_dirs=[GENERATED], extra_link_args=OPENMP + sanitize)
    cxx = (["-O1", "-g"] if sanitize else ["-O3"]) + OPENMP + sanitize
    if kind == "cuda":
        return cpp_extension.CUDAExtension("cem_fast._C", sources("cuda"), define_macros=[("WITH_CUDA", None)],
                                           extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, **common)
    return cpp_extension.CppExtension("cem_fast._C", sources("cpu"), extra_compile_args=cxx, **common)


def extension_and_builder(env: Optional[Mapping[str, str]] = None):
    """([the extension], {"build_ext": a builder that tries :func:`attempts` in turn}); needs torch."""
    import torch
    from torch.utils import cpp_extension

    with_cuda, why = cuda_choice(torch, cpp_extension.CUDA_HOME, env)
    tries = attempts(with_cuda, env)
    write_build_header(build_record(torch, False))
    required = any(fatal for _, fatal in tries)
    say(f"extension {'required (a switch is 1)' if required else 'optional (CEM_FAST_BUILD_EXT=auto)'}; "
        f"torch {torch.__version__}; CUDA kernels {why}; OpenMP {' '.join(OPENMP)} (compile and link)")
    sanitize = sanitizer_flags(env)
    # what setup() sees; build_extensions replaces it by the variant that builds
    placeholder = cpp_extension.CppExtension("cem_fast._C", sources("cpu"), optional=not required)

    class BuildExt(cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)):
        """Builds the first of ``tries`` that builds (see :func:`first_that_builds`), printing its progress, and
        writes ``_C.build.json`` beside the library (read when it does not load: built against another torch, it
        fails on undefined symbols before it can say what it was built against)."""

        record: Optional[dict] = None

        def build_extensions(self):
            compiler, (ext,) = self.compiler, self.extensions
            saved = {k: getattr(compiler, k) for k in ("compile", "_compile", "src_extensions")}
            saved["src_extensions"] = list(saved["src_extensions"])

            def build(kind: str) -> None:
                for k, v in saved.items():  # torch's build_extensions wraps the compiler's methods each time
                    setattr(compiler, k, list(v) if k == "src_extensions" else v)
                # the placeholder takes the variant's settings (setuptools keeps its own state on it)
                for k, v in vars(make_extension(kind, cpp_extension, sanitize)).items():
                    if not k.startswith("_"):
                        setattr(ext, k, v)
                ext.optional = False  # setuptools would swallow compiler errors: first_that_builds handles them
                self.record = build_record(torch, kind == "cuda")
                super(BuildExt, self).build_extensions()

            built = first_that_builds(tries, build)
            if built is None:
                self.extensions = []  # nothing to copy or install
                return
            self.write_record(os.path.dirname(self.get_ext_fullpath("cem_fast._C")))
            say(f"built cem_fast._C ({'CPU and CUDA' if built == 'cuda' else 'CPU'} kernels) against torch "
                f"{torch.__version__}")

        def build_extension(self, extension):
            """Progress lines: what is compiled, file n of m (ninja compiles in parallel and prints its own
            [n/m] lines), then the link."""
            srcs = list(extension.sources)
            kind = "CPU and CUDA" if any(s.endswith(".cu") for s in srcs) else "CPU"
            names = ", ".join(os.path.basename(s) for s in srcs)
            say(f"compiling {len(srcs)} source files of {extension.name} ({kind} kernels"
                f"{', with ninja: its [n/m] lines follow' if self.use_ninja else ''}): {names}")
            compiler = self.compiler
            original_compile, original_link = compiler._compile, compiler.link_shared_object
            done = [0]

            def compile_one(obj, src, *args, **kwargs):  # without ninja: one call per file
                done[0] += 1
                say(f"[{done[0]}/{len(srcs)}] compiling {os.path.basename(src)}")
                return original_compile(obj, src, *args, **kwargs)

            def link(*args, **kwargs):
                say(f"linking {extension.name}")
                return original_link(*args, **kwargs)

            compiler._compile, compiler.link_shared_object = compile_one, link
            try:
                super().build_extension(extension)
            finally:
                compiler._compile, compiler.link_shared_object = original_compile, original_link

        def copy_extensions_to_source(self):  # --inplace and editable installs
            super().copy_extensions_to_source()
            if self.extensions:
                build_py = self.get_finalized_command("build_py")
                self.write_record(build_py.get_package_dir("cem_fast"))

        def write_record(self, folder):
            """Only beside a library that is there (a failed optional build leaves none)."""
            library = os.path.basename(self.get_ext_filename(self.get_ext_fullname("cem_fast._C")))
            if self.record and os.path.exists(os.path.join(folder, library)):
                with open(os.path.join(folder, "_C.build.json"), "w") as f:
                    json.dump(self.record, f)

    return [placeholder], {"build_ext": BuildExt}


def extension_modules(env: Optional[Mapping[str, str]] = None):
    """(ext_modules, cmdclass) for setup(): none when the switches or a missing torch say so."""
    wanted, cuda = switch("CEM_FAST_BUILD_EXT", env), switch("CEM_FAST_CUDA", env)
    if wanted == "0" and cuda == "1":
        sys.exit("cem_fast build: CEM_FAST_CUDA=1 asks for the extension's CUDA kernels, but CEM_FAST_BUILD_EXT=0")
    if wanted == "0":
        say("extension skipped (CEM_FAST_BUILD_EXT=0): cem_fast runs on the torch backend")
        return [], {}
    required = "1" in (wanted, cuda)
    try:
        import torch  # noqa: F401
    except ImportError as e:
        if required:
            sys.exit(f"cem_fast build: CEM_FAST_BUILD_EXT or CEM_FAST_CUDA is 1 but torch is not importable ({e})")
        say(f"extension skipped: torch is not importable ({e}); cem_fast runs on the torch backend")
        return [], {}
    try:
        return extension_and_builder(env)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - torch's cpp_extension failing to set up is one more optional part
        if required:
            raise
        say(f"extension skipped: setting up its build failed ({_why(e)}); cem_fast runs on the torch backend")
        return [], {}
