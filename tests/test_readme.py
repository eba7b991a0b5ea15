"""What README.md says, checked: the install steps, what needs the project's shared data, the decided() codes,
both roi_psnr signatures, and the trust rules."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    level = title.split()[0]
    end = README.find(f"\n{level} ", start + len(title) + 2)
    return README[start:end]


def test_readme_install_gives_the_cpu_and_cuda_torch_commands_one_per_step():
    install = section("## Install")
    blocks = [b.strip() for b in install.split("```")[1::2]]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in blocks
    assert any(b.startswith("pip install torch --index-url https://download.pytorch.org/whl/cu") for b in blocks)
    assert all(len(b.splitlines()) == 1 for b in blocks), blocks  # one command per step
    # an extra names the installed cem_fast: never before the step that installs it
    assert install.index('"cem_fast[captum]"') > install.index("pip install --no-build-isolation .")
    assert "CEM_FAST_CUDA" in install and "TORCH_CUDA_ARCH_LIST" in install


def test_readme_never_points_at_the_shared_data_without_saying_a_clone_lacks_it():
    shared = section("### What needs the project's shared data")
    assert "configs/golden_*.yml" in shared and "tests/test_golden.py" in shared and "clone" in shared
    for paragraph in README.split("\n\n"):
        if "../shared" in paragraph:
            assert "clone" in paragraph, paragraph


def test_readme_documents_decided_codes_and_both_roi_psnr_signatures():
    from cem_fast.intervals import HELPS, HURTS, NO_EFFECT, UNDECIDED
    decided = next(p for p in README.split("\n- ") if p.startswith("`res.decided()`"))
    for code, word in ((HELPS, "helps"), (HURTS, "hurts"), (NO_EFFECT, "no effect"), (UNDECIDED, "undecided")):
        assert f"`{code}` {word}" in decided, (code, word)
    assert "cem_fast.ops.roi_psnr(outputs, target, roi" in README
    assert "torch.ops.cem_fast.roi_sq_err(outputs, target, y, x)" in README


def test_readme_states_the_trust_rules():
    for promise in ("trust_model_code", "--trust-model", "max_pixels", "error.json", "weights_only=True"):
        assert promise in README, promise
