"""Run configurations (cem_fast/config.py): configs that would exhaust memory or the stack are refused while the
YAML is composed, in one line, and --set values with the same limits; the plot_scale key."""
import pytest

from cem_fast.config import load_config
from helpers import one_line


# ---- configs that would exhaust memory or the stack: refused while the YAML is composed, in one line -----------------

CONFIG = "model: bicubic\nimages: [a.png]\nroi: [0, 0, 8]\n"


def billion_laughs(levels: int = 9) -> str:
    """Under an ignored key: 10 ** levels strings once expanded (5.7 GB written out as JSON)."""
    lines = ["prefix:", "  l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, match", [
    (billion_laughs(), r"YAML aliases are not accepted, got \*l0 \(line 6\)"),
    ("prefix: &a [1, *a]\n", r"YAML aliases are not accepted, got \*a"),  # a value that holds itself
    ("prefix: " + "[" * 10_000 + "]" * 10_000 + "\n", r"values may nest 32 levels deep, got more \(line 4\)"),
    ("prefix: {[1, 2]: 3}\n", r"keys must be names or numbers, got a list \(line 4\)"),
    ("? {a: 1}\n: 2\n", r"keys must be names or numbers, got a mapping \(line 4\)"),
])
def test_configs_that_would_explode_are_one_line_errors(tmp_path, text, match):
    from cem_fast.config import load_config
    cfg = tmp_path / "c.yml"
    cfg.write_text(CONFIG + text)
    with pytest.raises(ValueError, match=match) as e:
        load_config(str(cfg))
    assert one_line(e).startswith(f"config {str(cfg)!r}: ")


def test_set_values_are_read_with_the_same_limits(tmp_path):
    from cem_fast.config import load_config
    cfg = tmp_path / "c.yml"
    cfg.write_text(CONFIG)
    with pytest.raises(ValueError, match=r"^--set prefix: YAML aliases are not accepted, got \*a"):
        load_config(str(cfg), ["prefix=[&a [1, 2], *a]"])
    with pytest.raises(ValueError, match=r"^--set prefix: values may nest 32 levels deep"):
        load_config(str(cfg), ["prefix=" + "[" * 5000 + "]" * 5000])


def test_the_cli_refuses_an_alias_bomb_in_one_line(tmp_path, capsys):
    from cem_fast.cli import main
    cfg = tmp_path / "bomb.yml"
    cfg.write_text(CONFIG + billion_laughs())  # a.png does not exist: without the check the run fails (exit 1)
    assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"cem-fast: error: config {str(cfg)!r}: YAML aliases are not accepted, got *l0 (line 6): " \
                  "write the value out\n"


# ---- keys ------------------------------------------------------------------------------------------------------------

def test_plot_scale_config_key(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("model: bicubic\nimages: [x.png]\nroi: [0, 0, 8]\n")
    assert load_config(str(cfg)).options["plot_scale"] == "auto"
    assert load_config(str(cfg), ["plot_scale=paper"]).options["plot_scale"] == "paper"
    assert load_config(str(cfg), ["plot_scale=0.5"]).options["plot_scale"] == 0.5
    for bad in ("0", "big", "-1"):
        with pytest.raises(ValueError, match="plot_scale must be auto, paper or a positive bound in dB"):
            load_config(str(cfg), [f"plot_scale={bad}"])


@pytest.mark.parametrize("line,key,want", [("windows: on", "windows", "on"),
                                           ("incremental: off", "incremental", "off"),
                                           ("incremental: on", "incremental", "on"),
                                           ("locality: off", "locality", "off")])
def test_on_and_off_are_the_words_not_yamls_booleans(tmp_path, line, key, want):
    """YAML 1.1 reads on / off as true / false: the options whose words they are get the words back, in a config
    and with --set."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"task: DN\nmodel: bicubic\nimage: x.png\nroi: [8, 8, 16]\n{line}\n")
    assert load_config(str(cfg)).options[key] == want
    plain = tmp_path / "p.yml"
    plain.write_text("task: DN\nmodel: bicubic\nimage: x.png\nroi: [8, 8, 16]\n")
    assert load_config(str(plain), [f"{key}={line.split(': ')[1]}"]).options[key] == want


def test_windows_off_is_refused_with_the_words_it_takes(tmp_path, capsys):
    from cem_fast.cli import main
    cfg = tmp_path / "c.yml"
    cfg.write_text("task: DN\nmodel: bicubic\nimage: x.png\nroi: [8, 8, 16]\nwindows: off\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "cem-fast: error: windows must be one of auto, crop, on, got 'off'"
