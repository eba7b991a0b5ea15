"""The ops as torch.library operators: they exist under torch.ops.cem_fast, pass torch.library.opcheck (schema,
fake kernels, dynamic shapes) on every backend that can run here, and intervene -> model -> ROI scores compiles with
torch.compile(fullgraph=True) to the numbers of the eager reference. Also: cem_fast._C is loaded in one place,
which refuses an extension built against another torch; backends take their argument checks from cem_fast.op_args."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cem_fast import _extension, ops
from cem_fast.geometry import ROI
from cem_fast.reference import intervene_ref, roi_psnr_ref, roi_sq_err_multi_ref
from helpers import random_case
from model_factories import ConvStack

ROOT = Path(__file__).resolve().parents[2]
CPP_OPS = ["intervene", "intervene_into", "roi_sq_err", "roi_sq_err_multi"]
TRITON_OPS = ["intervene_triton", "intervene_triton_into", "roi_sq_err_triton", "roi_sq_err_multi_triton"]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors: the kernels run interpreted


def test_the_operators_exist_after_importing_ops():
    script = ("import torch, cem_fast.ops, cem_fast._extension as e, cem_fast.triton_ops as t\n"
              "print(e.IMPORT_ERROR is None, t.IMPORT_ERROR is None)\n"
              f"print(*[n for n in {CPP_OPS + TRITON_OPS} if hasattr(torch.ops.cem_fast, n)])")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")})
    assert p.returncode == 0, p.stderr[-2000:]
    built, triton = (v == "True" for v in p.stdout.split("\n")[0].split())
    assert p.stdout.split("\n")[1].split() == CPP_OPS * built + TRITON_OPS * triton


# --- opcheck -------------------------------------------------------------------------------------------------------

def intervene_args(device):
    """Every argument used: noise, rain, crops of the input; tiny, for the interpreter."""
    base, patches, idx, origins, sizes = random_case(0, h=6, w=5, pb=4, K=3, P=2)
    rain = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(1)) * 100
    windows = torch.tensor([[0, 0], [1, 0], [2, 0]])
    tensors = [t.to(device) for t in (base, patches, idx, origins, sizes, torch.arange(3) + 2 ** 33, rain, windows)]
    return tensors[:6], {"seed": 5, "noise_sigma": 20.0, "rain": tensors[6], "window_origins": tensors[7],
                         "window_size": [4, 5]}


def opcheck_cases(suffix, device):
    """(name, args, kwargs) for every operator of a backend: intervene with every option and with none, into a
    channels-last buffer, one ROI, and many."""
    (base, patches, idx, origins, sizes, ids), opts = intervene_args(device)
    out = torch.empty(3, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(2)
    outputs = torch.rand(2, 3, 6, 5, generator=g).to(device)
    target = torch.randint(0, 256, (3, 6, 5), generator=g, dtype=torch.uint8).to(device)
    rois = torch.tensor([[0, 0, 2, 2], [1, 1, 4, 3], [5, 4, 1, 1]], device=device)
    full = (base, patches, idx, origins, sizes, ids)
    return [(f"intervene{suffix}", full, opts), (f"intervene{suffix}", full[:5], {}),
            (f"intervene{suffix}_into", full[:5] + (out, ids), opts),
            (f"roi_sq_err{suffix}", (outputs, target[:, 1:4, 2:4], 1, 2), {}),
            (f"roi_sq_err_multi{suffix}", (outputs, target, rois), {})]


def operator(name):
    return getattr(torch.ops.cem_fast, name).default


def run_opcheck(name, args, kwargs):
    result = torch.library.opcheck(operator(name), args, kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.needs_backend("cpp")
@pytest.mark.parametrize("case", range(5))
def test_opcheck_cpp(case):
    run_opcheck(*opcheck_cases("", "cpu")[case])


@pytest.mark.needs_backend("cuda", device="cuda")
@pytest.mark.gpu
@pytest.mark.parametrize("case", range(5))
def test_opcheck_cuda(case):
    run_opcheck(*opcheck_cases("", "cuda")[case])


@pytest.mark.needs_backend("triton", device=TRITON_DEVICE)
@pytest.mark.parametrize("case", range(5))
def test_opcheck_triton(case):
    run_opcheck(*opcheck_cases("_triton", TRITON_DEVICE)[case])


@pytest.mark.needs_backend("cpp")
def test_fake_kernels_refuse_what_the_kernels_refuse():
    """The same ValueError while tracing (fake tensors) as when running."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    (base, patches, idx, origins, sizes, _), _ = intervene_args("cpu")
    with pytest.raises(ValueError, match="base must"):
        torch.ops.cem_fast.intervene(base[0], patches, idx, origins, sizes)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (base, patches, idx, origins, sizes)]
        assert torch.ops.cem_fast.intervene(*fake, window_size=[2, 3]).shape == (3, 3, 2, 3)
        with pytest.raises(ValueError, match="base must"):
            torch.ops.cem_fast.intervene(fake[0][0], *fake[1:])


# --- torch.compile(fullgraph=True) over intervene -> model -> ROI scores ----------------------------------------

BACKEND_PARAMS = [pytest.param("cpp", marks=pytest.mark.needs_backend("cpp")), "torch",
                  pytest.param("triton", marks=[pytest.mark.needs_backend("triton"), pytest.mark.interpreter])]


def pipeline_case():
    base, patches, idx, origins, sizes = random_case(3, h=10, w=10, pb=4, K=4, P=3)
    g = torch.Generator().manual_seed(4)
    target = torch.randint(0, 256, (3, 10, 10), generator=g, dtype=torch.uint8)
    return (base, patches, idx, origins, sizes, torch.arange(4) + 100), target


def small_net():
    """Conv 3 -> 4, ReLU, conv 4 -> 3, each parameter drawn with its own seed (its index)."""
    return ConvStack(2, width=4, act="relu", act_last=False, residual=None, init=0.1, seed_per_parameter=True).eval()


def pipeline(backend, model, target, roi=ROI(2, 3, 5, 4), rois=(ROI(0, 0, 5, 5), ROI(4, 2, 6, 8))):
    """Intervened inputs, the ROI PSNR of the model's outputs, and many ROIs' squared errors."""
    def run(base, patches, idx, origins, sizes, ids):
        x = ops.intervene(base, patches, idx, origins, sizes, ids=ids, seed=7, noise_sigma=15.0, backend=backend)
        y = model(x)
        ys, xs = roi.slices()
        return (x, ops.roi_psnr(y, target[:, ys, xs], roi, backend=backend),
                ops.roi_sq_err_multi(y, target, list(rois), backend=backend))
    return run


def reference_pipeline(model, target, args):
    """The same through the torch reference, eagerly: what every compiled backend must give."""
    x = intervene_ref(*args[:5], ids=args[5], seed=7, noise_sigma=15.0)
    y = model(x)
    roi = ROI(2, 3, 5, 4)
    ys, xs = roi.slices()
    return x, roi_psnr_ref(y, target[:, ys, xs], roi), roi_sq_err_multi_ref(y, target, [ROI(0, 0, 5, 5),
                                                                                        ROI(4, 2, 6, 8)])


def cem_fast_ops_in(graphs):
    return {str(n.target).removesuffix(".default") for gm in graphs for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("cem_fast.")}


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_pipeline_compiles_into_one_graph(backend):
    """dynamo and AOT autograd (fake kernels, functionalization) with the eager kernels: one graph, the numbers of
    the reference, bit for bit."""
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    args, target = pipeline_case()
    model = small_net()
    with torch.no_grad():
        got = torch.compile(pipeline(backend, model, target), fullgraph=True, backend=capture)(*args)
        want = reference_pipeline(model, target, args)
    assert len(graphs) == 1
    suffix = {"cpp": "", "triton": "_triton"}.get(backend)
    expected = set() if suffix is None else {f"cem_fast.{op}{suffix}" for op in ops.OPS}
    assert cem_fast_ops_in(graphs) == expected
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKEND_PARAMS[:2])
def test_pipeline_compiles_with_inductor(backend):
    """Inductor (C++ code generation on the CPU: about 17 s each on 2 cores without a warm cache; for torch it
    compiles intervene too): the interventions and the ROI scores of the reference; the model may be laid out by
    inductor in another memory order (its convolutions then add in another order), so its scores agree to
    round-off, not bit for bit."""
    torch._dynamo.reset()
    args, target = pipeline_case()
    model = small_net()
    with torch.no_grad():
        x, psnr, multi = torch.compile(pipeline(backend, model, target), fullgraph=True)(*args)
        x_ref, psnr_ref, multi_ref = reference_pipeline(model, target, args)
    assert torch.equal(x, x_ref)
    torch.testing.assert_close(psnr, psnr_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(multi, multi_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_the_buffer_path_compiles(backend):
    """intervene into the caller's channels-last buffer, compiled: the buffer holds the reference's values."""
    torch._dynamo.reset()
    args, _ = pipeline_case()
    buf = torch.full((4, 3, 10, 10), float("nan")).contiguous(memory_format=torch.channels_last)

    def into(base, patches, idx, origins, sizes, ids, out):
        return ops.intervene(base, patches, idx, origins, sizes, ids=ids, seed=7, noise_sigma=15.0, out=out,
                             backend=backend)

    torch.compile(into, fullgraph=True, backend="aot_eager")(*args, buf)
    assert torch.equal(buf, intervene_ref(*args[:5], ids=args[5], seed=7, noise_sigma=15.0))


# --- the extension's loading and the backends' dependencies -------------------------------------------------------

def test_an_extension_of_another_torch_is_named_in_one_line():
    assert _extension.build_mismatch(_extension.running_build()) is None
    why = _extension.build_mismatch({"torch": "2.0.0+cu118", "torch_cuda": "11.8", "cuda_kernels": True})
    assert why.count("\n") == 0
    assert f"built against torch 2.0.0+cu118 (CUDA 11.8) but torch {torch.__version__}" in why and "rebuild" in why


@pytest.mark.needs_backend("cpp")
@pytest.mark.parametrize("loads", [True, False], ids=["library loads", "library does not load"])
def test_cem_fast_refuses_an_extension_built_against_another_torch(loads):
    """Loaded: its build_info() differs from the running torch. Not loadable (another torch's library fails on
    undefined symbols): _C.build.json, written beside it by setup.py, says what it was built against."""
    script = ("import sys, torch\n"
              "torch.__version__ = '9.9.9+cpu'  # as if torch had been upgraded since the build\n"
              + ("" if loads else "sys.modules['cem_fast._C'] = None  # its import fails\n") +
              "from cem_fast import ops\n"
              "print(ops.backend_reasons('cpp', torch.device('cpu')))\n"
              "print(ops.resolve_backend('auto', torch.device('cpu')))")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    reasons, chosen = p.stdout.strip().split("\n")
    info = _extension._C.build_info()  # a CUDA build words its toolkit: "(CUDA 13.0)"
    built, cuda = info["torch"], info.get("torch_cuda") or "none"
    assert f"cem_fast._C was built against torch {built} (CUDA {cuda}) but torch 9.9.9+cpu" in reasons
    assert chosen == "torch"


def imports_of(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if re.match(r"\s*(from|import) ", line))


def test_only_the_extension_module_loads_the_library():
    loaders = [p.name for p in (ROOT / "cem_fast").rglob("*.py") if re.search(r"\b_C\b", imports_of(p))]
    assert loaders == ["_extension.py"]
    assert "cpp_ops" not in imports_of(ROOT / "cem_fast" / "cuda_ops.py")


def test_backends_take_their_checks_from_op_args():
    for name in ("cpp_ops.py", "cuda_ops.py", "triton_ops.py", "_extension.py"):
        assert "reference" not in imports_of(ROOT / "cem_fast" / name), name
