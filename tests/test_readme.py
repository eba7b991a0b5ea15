"""What README.md and the pages it links say, checked: the install steps, what needs the project's shared data, the
decided() codes, both roi_psnr signatures, the trust rules, and that every relative link and anchor resolves."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read(name: str) -> str:
    return (ROOT / name).read_text()


README = read("README.md")
# the pages these checks cover: the front door, the contributors' guide and the user docs written with them
PAGES = ["README.md", "CONTRIBUTING.md"] + [f"docs/{p}.md" for p in (
    "method", "uncertainty", "speed", "cli-and-config", "models", "ops", "distributed", "from-the-reference",
    "install")]


def section(text: str, title: str) -> str:
    """From the heading ``title`` to the next heading of its level or above."""
    start = text.index(f"\n{title}\n")
    level = len(title.split()[0])
    nxt = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, start + len(title) + 2)
    return text[start:nxt.start() if nxt else len(text)]


def test_readme_install_gives_the_cpu_and_cuda_torch_commands_one_per_step():
    install = section(README, "## Install")
    blocks = [b.strip() for b in install.split("```")[1::2]]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in blocks
    assert any(b.startswith("pip install torch --index-url https://download.pytorch.org/whl/cu") for b in blocks)
    assert all(len(b.splitlines()) == 1 for b in blocks), blocks  # one command per step
    # an extra names the installed cem_fast: never before the step that installs it
    assert install.index('"cem_fast[captum]"') > install.index("pip install --no-build-isolation .")
    assert "CEM_FAST_CUDA" in install and "TORCH_CUDA_ARCH_LIST" in install


def test_docs_never_point_at_the_shared_data_without_saying_a_clone_lacks_it():
    shared = section(read("CONTRIBUTING.md"), "### What needs the project's shared data")
    assert "configs/golden_*.yml" in shared and "tests/integration/test_golden.py" in shared and "clone" in shared
    for page in PAGES:
        for paragraph in read(page).split("\n\n"):
            if "../shared" in paragraph:
                assert "clone" in paragraph, (page, paragraph)


def test_docs_document_decided_codes_and_both_roi_psnr_signatures():
    from cem_fast.intervals import HELPS, HURTS, NO_EFFECT, UNDECIDED
    uncertainty = read("docs/uncertainty.md")
    decided = next(p for p in uncertainty.split("\n- ") if p.startswith("`res.decided()`"))
    for code, word in ((HELPS, "helps"), (HURTS, "hurts"), (NO_EFFECT, "no effect"), (UNDECIDED, "undecided")):
        assert f"`{code}` {word}" in decided, (code, word)
    ops = read("docs/ops.md")
    assert "cem_fast.ops.roi_psnr(outputs, target, roi" in ops
    assert "torch.ops.cem_fast.roi_sq_err(outputs, target, y, x)" in ops


def test_docs_state_the_trust_rules():
    models, cli = read("docs/models.md"), read("docs/cli-and-config.md")
    for promise in ("trust_model_code", "--trust-model", "weights_only=True"):
        assert promise in models, promise
    for promise in ("trust_model_code", "--trust-model", "max_pixels", "error.json"):
        assert promise in cli, promise


def _without_code(text: str) -> str:
    lines, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        lines.append("" if fenced or line.lstrip().startswith("```") else line)
    return "\n".join(lines)


def _anchors(text: str) -> set:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -1, -2 ... for repeats."""
    seen: dict = {}
    for m in re.finditer(r"^#{1,6}\s+(.*)$", _without_code(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_every_relative_link_and_anchor_resolves():
    bad = []
    for page in PAGES + ["docs/study.md", "benchmarks/README.md", "tests/README.md"]:
        path = ROOT / page
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _without_code(path.read_text())):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{page}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                bad.append(f"{page}: {target} (no such heading)")
    assert not bad, bad
