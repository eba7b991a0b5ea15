"""The ops' one validation (cem_fast/op_checks.py): hostile inputs found from outside, each refused with one
ValueError naming the argument on every backend (the public ops, and the operators themselves where they are
public: torch.ops.cem_fast.*), never a read outside a buffer or a silent wrap-around."""
import pytest
import torch

from cem_fast import op_checks, ops
from cem_fast.geometry import ROI


def L(*v):
    return torch.tensor(v)


BANK = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.needs_backend("cpp")),
            pytest.param("triton", marks=[pytest.mark.needs_backend("triton"), pytest.mark.interpreter])]


def call(backend, patch_idx=L(0), origins=L(0, 0), sizes=L(8, 8), **kw):
    base = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    return ops.intervene(base, BANK, patch_idx, origins.view(-1, 2), sizes.view(-1, 2), backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,message", [
    (dict(patch_idx=L(10**6)), r"patch_idx\[0\] = 1000000 is not a patch of the 4-patch bank"),
    (dict(patch_idx=L(-1)), r"patch_idx\[0\] = -1 is not a patch"),  # the torch backend wrapped to the last patch
    (dict(sizes=L(9, 8)), r"sizes\[0\] = \(9, 8\) must lie within the 8x8 patches"),
    (dict(origins=L(2**63 - 1, 0)), r"origins\[0\] = \(9223372036854775807, 0\).*inside the 16x16 base"),
    (dict(origins=L(12, 0)), r"origins\[0\] = \(12, 0\) with size \(8, 8\)"),
    (dict(window_origins=L(2**63 - 1, 0).view(1, 2), window_size=[4, 4]), r"window_origins\[0\]"),
    (dict(window_origins=L(-1, 0).view(1, 2), window_size=[4, 4]), r"window_origins\[0\] = \(-1, 0\)"),
    (dict(window_origins=L(0, 0).view(1, 2), window_size=[17, 4]), r"window_size must be"),
    (dict(ids=L(1), noise_sigma=float("inf")), r"noise_sigma must be a finite number in \[0, 4096\], got inf"),
    (dict(ids=L(1), noise_sigma=float("nan")), r"noise_sigma must be a finite number"),
    (dict(ids=L(1), noise_sigma=-3.0), r"noise_sigma must be a finite number"),
    (dict(noise_sigma=5.0), r"ids are required"),
    (dict(rain=torch.full((3, 16, 16), float("nan"))), r"rain must be finite and non-negative"),
    (dict(rain=torch.full((3, 16, 16), -2.0)), r"rain must be finite and non-negative"),
    (dict(out=torch.zeros(1, 3, 1, 16).expand(1, 3, 16, 16)), r"out must not overlap itself"),
    (dict(patch_idx=L(0.0)), r"patch_idx must be an integer tensor"),
])
def test_every_backend_refuses_a_hostile_intervene(backend, kwargs, message):
    with pytest.raises(ValueError, match=message):
        call(backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_values_off_the_uint8_grid_are_refused(backend):
    base = torch.rand(3, 16, 16)
    for bank in (BANK.float() - 1, BANK.float() + 0.5, BANK.long() + 200):
        with pytest.raises(ValueError, match="patches must hold integers 0..255"):
            ops.intervene(base, bank, L(0), L(0, 0).view(1, 2), L(8, 8).view(1, 2), backend=backend)


@pytest.mark.needs_backend("cpp")
def test_the_cpp_operator_checks_without_overflow():
    """The cases of the report, straight to the operator: each sum origin + size would wrap past the old check."""
    base, wo = torch.rand(3, 16, 16), dict(window_origins=L(2**63 - 1, 0).view(1, 2), window_size=[4, 4])
    with pytest.raises(ValueError, match=r"window_origins\[0\] = \(9223372036854775807, 0\)"):
        torch.ops.cem_fast.intervene(base, BANK, L(0), L(0, 0).view(1, 2), L(8, 8).view(1, 2), **wo)
    with pytest.raises(ValueError, match=r"origins\[0\] = \(9223372036854775807, 0\)"):
        torch.ops.cem_fast.intervene(base, BANK, L(0), L(2**63 - 1, 0).view(1, 2), L(8, 8).view(1, 2))
    with pytest.raises(ValueError, match=r"noise_sigma must be a finite number in \[0, 4096\], got inf"):
        torch.ops.cem_fast.intervene(base, BANK, L(0), L(0, 0).view(1, 2), L(8, 8).view(1, 2), ids=L(1),
                                     noise_sigma=float("inf"))
    out = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"roi \(9223372036854775806, 0, 4x4\) must lie inside"):
        torch.ops.cem_fast.roi_sq_err(out, torch.zeros(3, 4, 4), 2**63 - 2, 0)
    with pytest.raises(ValueError, match=r"roi 0 \(4611686018427387904, 0, 4611686018427387904x4\)"):
        torch.ops.cem_fast.roi_sq_err_multi(out, torch.zeros(3, 8, 8), L(2**62, 0, 2**62, 4).view(1, 4))
    with pytest.raises(ValueError, match=r"target must hold integers 0..255"):
        torch.ops.cem_fast.roi_sq_err(out, torch.full((3, 4, 4), 0.5), 0, 0)


@pytest.mark.needs_backend("triton")
@pytest.mark.interpreter
def test_the_triton_operators_check_in_their_bodies():
    base, out = torch.rand(3, 16, 16), torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"cem_fast::intervene_triton: patch_idx\[0\] = 1000000"):
        torch.ops.cem_fast.intervene_triton(base, BANK, L(10**6), L(0, 0).view(1, 2), L(8, 8).view(1, 2))
    with pytest.raises(ValueError, match=r"rois\[0\] \(y=4611686018427387904"):
        torch.ops.cem_fast.roi_sq_err_multi_triton(out, torch.zeros(3, 8, 8), L(2**62, 0, 2**62, 4).view(1, 4))
    with pytest.raises(ValueError, match=r"roi \(y=6, x=0, 4x4\) must lie inside the 8x8 outputs"):
        torch.ops.cem_fast.roi_sq_err_triton(out, torch.zeros(3, 4, 4), 6, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rois,target,message", [
    ([ROI(6, 5, 3, 2)], torch.zeros(3, 8, 8), r"rois\[0\] \(y=6, x=5, 3x2\) must lie inside the 8x8 outputs"),
    ([ROI(0, 0, 2, 2)], torch.full((3, 8, 8), 300.0), r"target must hold integers 0..255"),
    ([ROI(0, 0, 2, 2)], torch.full((3, 8, 8), 2.5), r"with fractions"),
    ([ROI(0, 0, 2, 2)], torch.zeros(3, 8, 7), r"target must be a \(3, 8, 8\) tensor"),
])
def test_every_backend_refuses_a_hostile_roi(backend, rois, target, message):
    out = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=message):
        ops.roi_sq_err_multi(out, target, rois, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_roi_far_outside_is_refused_before_any_kernel(backend):
    with pytest.raises(ValueError, match=r"roi \(y=9223372036854775806, x=0, 4x4\) must lie inside the 8x8"):
        ops.roi_sq_err(torch.rand(2, 3, 8, 8), torch.zeros(3, 4, 4), ROI(2**63 - 2, 0, 4, 4), backend=backend)


def test_roi_refuses_what_no_kernel_can_read():
    for args in ((-1, 0, 4, 4), (0, 0, 0, 4), (0, 0, 4, True), (0.5, 0, 4, 4)):
        with pytest.raises(ValueError, match="roi"):
            ROI(*args)
    assert ROI(torch.tensor(3).item(), 1, 2, 2).y == 3


def test_the_pipelines_fast_path_is_unchecked_unless_asked(monkeypatch):
    """intervene_unchecked skips the value checks (the pipeline builds its indices); the test suite turns them
    on (CEM_FAST_CHECK_INTERNAL_OPS=1), so that every pipeline test also checks what the pipeline builds."""
    base = torch.rand(3, 16, 16)
    args = (base, BANK, L(0), L(0, 0).view(1, 2), L(9, 8).view(1, 2))
    monkeypatch.setenv("CEM_FAST_CHECK_INTERNAL_OPS", "1")
    with pytest.raises(ValueError, match="sizes"):
        ops.intervene_unchecked(*args, backend="torch")
    monkeypatch.setenv("CEM_FAST_CHECK_INTERNAL_OPS", "0")
    calls = []
    monkeypatch.setattr(op_checks, "_check_intervene_values", lambda *a: calls.append(a))
    ops.intervene_unchecked(*args[:4], L(8, 8).view(1, 2), backend="torch")
    assert calls == []
    ops.intervene(*args[:4], L(8, 8).view(1, 2), backend="torch")
    assert len(calls) == 1


@pytest.mark.needs_backend("cpp")
def test_the_pipelines_trust_is_scoped_and_the_cpu_kernels_check_anyway(monkeypatch):
    """The fast paths tell the C++ operators that the indices are the pipeline's own (the CUDA kernels then skip
    their host-side checks, each a synchronisation), only for the call, and never while the suite checks them."""
    from cem_fast import _extension
    seen = []
    real = _extension._C.set_trusted_indices
    monkeypatch.setattr(_extension._C, "set_trusted_indices", lambda on: seen.append(on) or real(on))
    args = (torch.rand(3, 16, 16), BANK, L(0), L(0, 0).view(1, 2), L(8, 8).view(1, 2))
    monkeypatch.setenv("CEM_FAST_CHECK_INTERNAL_OPS", "0")
    ops.intervene_unchecked(*args, backend="cpp")
    assert seen == [True, False] and real(False) is False  # set for the call, then restored
    monkeypatch.setenv("CEM_FAST_CHECK_INTERNAL_OPS", "1")
    ops.intervene_unchecked(*args, backend="cpp")
    assert seen == [True, False]  # not trusted while the suite checks the pipeline's indices
    with _extension.trusted_indices(), pytest.raises(ValueError, match=r"patch_idx\[0\] = 9"):
        torch.ops.cem_fast.intervene(args[0], BANK, L(9), *args[3:])  # the CPU kernel checks even when trusted


# ---- device checks on every tensor argument --------------------------------------------------------------------------

def _intervene_args(device_of_ids="cpu"):
    return dict(base=torch.rand(3, 8, 8), patches=torch.zeros(4, 3, 4, 4, dtype=torch.uint8),
                patch_idx=torch.zeros(2, dtype=torch.long), origins=torch.zeros(2, 2, dtype=torch.long),
                sizes=torch.full((2, 2), 4, dtype=torch.long), ids=torch.zeros(2, dtype=torch.long,
                                                                               device=device_of_ids))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_a_tensor_on_another_device_is_refused_before_any_launch(backend):
    args = _intervene_args("meta")  # stands for a host tensor given with device tensors
    with pytest.raises(ValueError, match=r"intervene: ids is on meta, expected cpu like base"):
        ops.intervene(noise_sigma=10.0, backend=backend, **args)
    out = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"roi_sq_err: target is on meta, expected cpu like outputs"):
        ops.roi_sq_err(out, torch.zeros(3, 4, 4, device="meta"), ROI(0, 0, 4, 4), backend=backend)
    with pytest.raises(ValueError, match=r"roi_sq_err_multi: target is on meta"):
        ops.roi_sq_err_multi(out, torch.zeros(3, 8, 8, device="meta"), [ROI(0, 0, 4, 4)], backend=backend)
