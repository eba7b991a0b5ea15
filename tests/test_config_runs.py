"""The runs of a config, piece by piece: the folder and label of each image, the temporaries a killed run leaves,
the run line's locality note. The runs themselves, as the ``cem-fast`` command makes them, are tested in
test_cli.py."""
from cem_fast.config_runs import OUR_TEMPORARY, _locality_note, image_labels
from cem_fast.names import safe_name


def test_the_run_line_names_how_interventions_ran():
    base = {"active": True, "skipped_blocks": 12, "crop": [0, 0, 40, 40]}
    assert _locality_note(base) == " (locality: 12 blocks skipped, crop 40x40 input px, verified)"
    assert "recomputed layer by layer" in _locality_note({**base, "incremental": {"used": True},
                                                          "windows": {"used": True}})
    assert "each intervention on its own window" in _locality_note({**base, "incremental": {"used": False},
                                                                    "windows": {"used": True}})


def test_folder_names_keep_letters_of_any_script_and_stay_safe():
    folders, labels = image_labels(["/a/ïmg_😀.png", "/b/ïmg_😁.png", "/c/日本語 テスト.png", "/d/नमस्ते.png",
                                    "/e/😀.png", "/f/i\u0308mg_2.jpg", "/g/a\u202eb.png", "/h/.hidden.png"])
    assert folders == ["ïmg", "ïmg_2", "日本語_テスト", "नमस्ते", "image", "ïmg_2_2", "a_b", "hidden"]
    assert labels[:2] == ["ïmg_😀.png", "ïmg_😁.png"]  # the report tells them apart by their names
    assert safe_name("ä" * 300).encode() == ("ä" * 100).encode()  # at most 200 bytes: a file name may hold 255
    assert safe_name("report.html") == "report.html_" and safe_name("..") == "run"
    # what a killed compare leaves under such a name is cleaned up
    assert OUR_TEMPORARY.match(".ïmg_cem.png.tmp12") and not OUR_TEMPORARY.match(".ïmg.png.tmp12")
