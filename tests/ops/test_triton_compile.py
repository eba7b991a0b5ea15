"""Every Triton kernel compiles for Hopper (sm_90) with no GPU present: catches lowering errors that the
interpreter does not see. Runs in a subprocess because this test session imports the kernels for the interpreter."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (the kernels' compile check needs it)")

SCRIPT = textwrap.dedent('''
    import json, triton
    print(triton.__version__)
    from triton.backends.compiler import GPUTarget
    from cem_fast._kernels.intervene import _intervene_kernel
    from cem_fast._kernels.roi_sq_err import _roi_sq_err_kernel

    INTERVENE = {"out_ptr": "*fp32", "base_ptr": "*fp32", "patch_ptr": "*u8", "idx_ptr": "*i64", "org_ptr": "*i64",
                 "size_ptr": "*i64", "win_ptr": "*i64", "ids_ptr": "*i64", "rain_ptr": "*fp32", "lut_ptr": "*fp32",
                 "seed": "i64", "sigma_q": "i64", "C": "constexpr", "h": "i32", "w": "i32", "wh": "i32", "ww": "i32",
                 "pb": "i32", "P": "i32", "s_ok": "i64", "s_oc": "i64", "s_oh": "i64", "s_ow": "i64", "NOISY": "constexpr",
                 "RAINY": "constexpr", "BLOCK_W": "constexpr", "CL": "constexpr"}
    ROI = {"out_ptr": "*fp64", "x_ptr": "*fp32", "t_ptr": "*i32", "y0": "i32", "x0": "i32", "rh": "i32",
           "rw": "i32", "C": "constexpr", "s_k": "i64", "s_c": "i64", "s_h": "i64", "s_w": "i64", "rois_ptr": "*i64",
           "n_rois": "i32", "TH": "i32", "TW": "i32", "H": "i32", "W": "i32", "BLOCK": "constexpr", "MULTI": "constexpr", "CL": "constexpr"}

    def compile_sm90(fn, sig, constexprs, **options):
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options or None)

    def as_the_jit_specialises(fn, sig, constexprs, value):
        """Every integer argument the JIT may turn into a constant (those equal to 1) given as that constant."""
        dns = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
        ints = [n for n, t in sig.items() if t in ("i32", "i64") and n not in dns]
        return ({**sig, **{n: "constexpr" for n in ints}}, {**constexprs, **{n: value for n in ints}})

    report = {}
    for fn, sig, cx in ((_intervene_kernel, INTERVENE, {"NOISY": True, "RAINY": True, "BLOCK_W": 256, "C": 3,
                                                        "CL": True}),
                        (_roi_sq_err_kernel, ROI, {"BLOCK": 128, "MULTI": True, "C": 3, "CL": True}),
                        (_roi_sq_err_kernel, ROI, {"BLOCK": 32, "MULTI": False, "C": 3, "CL": False})):
        k = compile_sm90(fn, *as_the_jit_specialises(fn, sig, cx, 1))
        report[f"{fn.__name__} {cx} with integer arguments = 1"] = {
            "cubin": "cubin" in k.asm, "fma": fn is _roi_sq_err_kernel and "fma.rn.f32" in k.asm["ptx"]}
    for out in ("*fp32", "*fp16", "*bf16"):
        for noisy, rainy in ((False, False), (True, False), (False, True)):
            for cl in (False, True):
                k = compile_sm90(_intervene_kernel, dict(INTERVENE, out_ptr=out),
                                 {"NOISY": noisy, "RAINY": rainy, "BLOCK_W": 256, "C": 3, "CL": cl})
                report[f"intervene {out} noisy={noisy} rainy={rainy} cl={cl}"] = {"cubin": "cubin" in k.asm,
                                                                                   "fma": False}
    for x in ("*fp32", "*fp16", "*bf16"):
        for multi in (False, True):
            for cl in (False, True):
                k = compile_sm90(_roi_sq_err_kernel, dict(ROI, x_ptr=x),
                                 {"BLOCK": 128, "MULTI": multi, "C": 3, "CL": cl})
                report[f"roi {x} multi={multi} cl={cl}"] = {"cubin": "cubin" in k.asm,
                                                            "fma": "fma.rn.f32" in k.asm["ptx"]}
    print(json.dumps(report))
''')


# The GPU machine's Triton (GPU.md: 3.6.0), installed by the Makefile beside the venv's newer one (whose interpreter
# runs the CPU tests; 3.6's interpreter does not run on numpy 2), so that version drift shows up here.
GPU_IMAGE_TRITON = Path(sys.prefix) / "triton-gpu-image"


@pytest.mark.parametrize("triton_of", ["venv", "gpu-image"])
def test_every_triton_kernel_compiles_for_sm90(triton_of):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    if triton_of == "gpu-image":
        if not (GPU_IMAGE_TRITON / "triton").is_dir():
            pytest.skip(f"the GPU image's triton is not installed in {GPU_IMAGE_TRITON} (make venv installs it)")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GPU_IMAGE_TRITON), env.get("PYTHONPATH")) if p)
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert lines[0] == ("3.6.0" if triton_of == "gpu-image" else __import__("triton").__version__)
    report = json.loads(lines[-1])
    assert len(report) == 33
    for name, r in report.items():
        assert r["cubin"], f"{name}: no cubin"
        # the ROI kernel must round x * 255 before the round-half-even step, like the reference: no FMA, with the
        # compiler's default fp fusion (torch.compile launches it through triton_op without enable_fp_fusion=False)
        assert not r["fma"], f"{name}: fused multiply-add in the PTX"
