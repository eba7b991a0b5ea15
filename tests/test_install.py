"""The install never fails for an optional part (build_support.py, the logic of setup.py): decisions tested as
functions, and a real setuptools build_ext run on a tiny stand-in extension whose CUDA build fails the way torch's
``_get_cuda_arch_flags`` does without a GPU (IndexError), falling back to the CPU build."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import build_support  # noqa: E402

sys.path.remove(str(ROOT))


def fake_torch(cuda: "str | None" = "12.4", gpus: int = 0):
    return SimpleNamespace(__version__="2.13.0" + ("+cu124" if cuda else "+cpu"),
                           version=SimpleNamespace(cuda=cuda),
                           cuda=SimpleNamespace(device_count=lambda: gpus))


# ---- which parts to build ------------------------------------------------------------------------------------

def test_no_gpu_and_no_arch_list_means_no_cuda_kernels_unless_asked():
    ok, why = build_support.cuda_choice(fake_torch(gpus=0), "/usr/local/cuda", env={})
    assert not ok and "no GPU is visible" in why and "TORCH_CUDA_ARCH_LIST" in why
    with pytest.raises(SystemExit, match="CEM_FAST_CUDA=1 but no GPU is visible.*TORCH_CUDA_ARCH_LIST"):
        build_support.cuda_choice(fake_torch(gpus=0), "/usr/local/cuda", env={"CEM_FAST_CUDA": "1"})
    ok, why = build_support.cuda_choice(fake_torch(gpus=0), "/usr/local/cuda", env={"TORCH_CUDA_ARCH_LIST": "9.0"})
    assert ok and "TORCH_CUDA_ARCH_LIST=9.0" in why
    ok, why = build_support.cuda_choice(fake_torch(gpus=2), "/usr/local/cuda", env={})
    assert ok and "2 visible GPU(s)" in why


def test_device_count_is_read_from_torch_and_a_failing_one_counts_as_none():
    assert not build_support.cuda_choice(fake_torch(gpus=0), "/cuda", env={})[0]
    assert build_support.cuda_choice(fake_torch(gpus=1), "/cuda", env={})[0]

    def no_driver():
        raise RuntimeError("Found no NVIDIA driver on your system")

    torch = fake_torch()
    torch.cuda.device_count = no_driver
    assert build_support.visible_gpus(torch) == 0


def test_cpu_torch_or_missing_toolkit():
    assert build_support.cuda_choice(fake_torch(cuda=None, gpus=1), "/cuda", env={}) == \
        (False, "no (torch 2.13.0+cpu is a CPU build)")
    assert "no CUDA toolkit" in build_support.cuda_choice(fake_torch(gpus=1), None, env={})[1]
    with pytest.raises(SystemExit, match="CEM_FAST_CUDA=1 but torch 2.13.0\\+cpu is a CPU build"):
        build_support.cuda_choice(fake_torch(cuda=None), "/cuda", env={"CEM_FAST_CUDA": "1"})
    assert build_support.cuda_choice(fake_torch(gpus=1), "/cuda", env={"CEM_FAST_CUDA": "0"})[0] is False


@pytest.mark.parametrize("env,with_cuda,expected", [
    ({}, True, [("cuda", False), ("cpu", False)]),
    ({}, False, [("cpu", False)]),
    ({"CEM_FAST_BUILD_EXT": "1"}, True, [("cuda", False), ("cpu", True)]),  # the CUDA half may still fall back
    ({"CEM_FAST_CUDA": "1"}, True, [("cuda", True)]),  # no fallback
    ({"CEM_FAST_CUDA": "0"}, False, [("cpu", False)]),
])
def test_attempts(env, with_cuda, expected):
    assert build_support.attempts(with_cuda, env) == expected


def test_bad_switch_value_is_one_line():
    with pytest.raises(SystemExit, match="CEM_FAST_CUDA must be auto, 0 or 1, got 'yes'"):
        build_support.switch("CEM_FAST_CUDA", {"CEM_FAST_CUDA": "yes"})


# ---- falling back ----------------------------------------------------------------------------------------------

def builder(failing: set):
    built = []

    def build(kind):
        if kind in failing:
            raise IndexError("list index out of range")
        built.append(kind)
    return build, built


def test_any_error_of_the_cuda_build_falls_back_to_the_cpu_build():
    lines = []
    build, built = builder({"cuda"})
    assert build_support.first_that_builds([("cuda", False), ("cpu", False)], build, lines.append) == "cpu"
    assert built == ["cpu"]
    assert lines == ["CUDA kernels skipped: building them failed (IndexError: list index out of range); building "
                     "the CPU kernels only (CEM_FAST_CUDA=1 makes this fail the install)"]


def test_nothing_builds_means_no_extension_and_one_line():
    lines = []
    build, built = builder({"cuda", "cpu"})
    assert build_support.first_that_builds([("cuda", False), ("cpu", False)], build, lines.append) is None
    assert len(lines) == 2 and lines[1].startswith("FAILED to build cem_fast._C (CPU kernels): IndexError")
    assert "extension skipped: cem_fast runs on the torch backend" in lines[1]


@pytest.mark.parametrize("tries", [[("cuda", True)], [("cuda", False), ("cpu", True)]])
def test_a_forced_part_that_fails_fails(tries):
    lines = []
    build, _ = builder({"cuda", "cpu"})
    with pytest.raises(IndexError):
        build_support.first_that_builds(tries, build, lines.append)
    assert lines[-1].startswith("FAILED to build cem_fast._C") and "so the install fails" in lines[-1]


def test_missing_torch_skips_the_extension(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    assert build_support.extension_modules(env={}) == ([], {})
    assert "extension skipped: torch is not importable" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="torch is not importable"):
        build_support.extension_modules(env={"CEM_FAST_BUILD_EXT": "1"})


# ---- a real build_ext run with the builder setup.py uses ------------------------------------------------------

TINY = "extern \"C\" int cem_fast_tiny() { return 42; }\n"


def run_build_ext(tmp_path, monkeypatch, env, cuda_fails=True):
    """setuptools' build_ext with build_support's builder on a one-line C++ file, the CUDA variant failing in the
    builder with torch's IndexError."""
    pytest.importorskip("torch")
    from setuptools import Distribution
    from torch.utils import cpp_extension

    (tmp_path / "tiny.cpp").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(build_support, "GENERATED", str(tmp_path / "generated"))
    monkeypatch.setattr(build_support, "cuda_choice", lambda torch, home, env=None: (True, "yes (simulated)"))

    def make_extension(kind, cpp_ext, sanitize):
        ext = cpp_ext.CppExtension("cem_fast._C", ["tiny.cpp"], extra_compile_args=["-O0"])
        ext.simulated_kind = kind
        return ext

    monkeypatch.setattr(build_support, "make_extension", make_extension)
    real = cpp_extension.BuildExtension.build_extensions

    def build_extensions(self):  # torch's _get_cuda_arch_flags with no GPU and no TORCH_CUDA_ARCH_LIST
        if cuda_fails and any(getattr(e, "simulated_kind", "") == "cuda" for e in self.extensions):
            raise IndexError("list index out of range")
        return real(self)

    monkeypatch.setattr(cpp_extension.BuildExtension, "build_extensions", build_extensions)
    ext_modules, cmdclass = build_support.extension_modules(env=env)
    dist = Distribution({"name": "cem_fast", "ext_modules": ext_modules, "cmdclass": cmdclass})
    dist.script_name = "setup.py"
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "temp")
    cmd.ensure_finalized()
    cmd.run()
    return tmp_path / "lib" / "cem_fast"


def test_build_ext_falls_back_from_a_failing_cuda_build_to_the_cpu_build(tmp_path, monkeypatch, capfd):
    lib = run_build_ext(tmp_path, monkeypatch, env={})
    out = capfd.readouterr().out
    assert "cem_fast build: CUDA kernels skipped: building them failed (IndexError: list index out of range)" in out
    assert "cem_fast build: compiling 1 source files of cem_fast._C (CPU kernels" in out
    assert "cem_fast build: built cem_fast._C (CPU kernels)" in out
    assert list(lib.glob("_C*.so"))
    assert json.loads((lib / "_C.build.json").read_text())["cuda_kernels"] is False


def test_build_ext_with_cuda_forced_fails(tmp_path, monkeypatch, capfd):
    with pytest.raises(IndexError):
        run_build_ext(tmp_path, monkeypatch, env={"CEM_FAST_CUDA": "1"})
    assert "FAILED to build cem_fast._C (CUDA kernels): IndexError" in capfd.readouterr().out


def test_build_ext_where_nothing_builds_installs_without_the_extension(tmp_path, monkeypatch, capfd):
    (tmp_path / "tiny.cpp").write_text("this is not C++\n")
    orig = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, t, *a, **k: orig(self, "this is not C++\n", *a, **k)
                        if self.name == "tiny.cpp" else orig(self, t, *a, **k))
    lib = run_build_ext(tmp_path, monkeypatch, env={})
    out = capfd.readouterr().out
    assert "cem_fast build: FAILED to build cem_fast._C (CPU kernels)" in out
    assert "extension skipped: cem_fast runs on the torch backend" in out
    assert not list(lib.glob("_C*.so")) if lib.exists() else True


def test_setup_py_takes_its_logic_from_build_support():
    text = (ROOT / "setup.py").read_text()
    assert "from build_support import extension_modules" in text
    assert "build_support.py" in (ROOT / "MANIFEST.in").read_text()  # in an sdist too


# ---- what the README says about installing, and what a clone lacks ------------------------------------------

