"""Safe file names from spreadsheet cells (RELIABILITY.md: files and downloads)."""

from engine.naming import (
    fill_filename_pattern,
    pattern_fields,
    pattern_values,
    row_digits,
    safe_filename,
)


def test_parent_directory_parts_never_survive():
    name = safe_filename("../../etc/passwd", set())
    assert "/" not in name and "\\" not in name and ".." not in name
    assert name.endswith(".png")


def test_absolute_paths_become_plain_names():
    for stem in ("/etc/passwd", "C:\\Windows\\system32", "\\\\server\\share\\x"):
        name = safe_filename(stem, set())
        assert not name.startswith(("/", "\\")) and ":" not in name and "\\" not in name and "/" not in name


def test_windows_reserved_names_are_suffixed():
    used: set[str] = set()
    assert safe_filename("CON", used) == "CON_.png"
    assert safe_filename("nul", used) == "nul_.png"
    assert safe_filename("com1.final", used) == "com1_.final.png"  # "COM1.final" is still the device
    assert safe_filename("NUL.tar", used) == "NUL_.tar.png"
    assert safe_filename("LPT9", used) == "LPT9_.png"
    assert safe_filename("CONSOLE", used) == "CONSOLE.png"  # only exact device names are reserved


def test_invisible_format_characters_are_dropped_so_a_name_shows_what_it_is():
    assert safe_filename("photo\u202egnp.exe", set()) == "photognp.exe.png"
    assert safe_filename("a\u200bb\ufeffc\u2066d", set()) == "abcd.png"


def test_a_safe_name_made_safe_again_is_unchanged():
    """The batch names a row's file and its zip entry in two passes: they must agree."""
    from pathlib import Path

    for stem in ("aux.txt", "con.v2", "COM1", " lpt¹ .x", "..a..b..", "Ｃａｔ", "x\u202ey", "a" * 300, ""):
        once = safe_filename(stem, set())
        assert safe_filename(Path(once).stem, set()) == once, stem


def test_full_width_characters_are_normalised():
    assert safe_filename("ＣＡＴ／ｄｏｇ", set()) == "CAT_dog.png"
    # NFKC turns the full-width device name into a real one, which is then suffixed.
    assert safe_filename("ＣＯＮ", set()) == "CON_.png"


def test_names_are_unique_regardless_of_case():
    used: set[str] = set()
    assert safe_filename("Cat", used) == "Cat.png"
    assert safe_filename("cat", used) == "cat_2.png"
    assert safe_filename("CAT", used) == "CAT_3.png"
    assert "cat.png" in used and "cat_2.png" in used


def test_illegal_and_control_characters_replaced_and_length_capped():
    name = safe_filename('a<b>c:"d|e?f*g\x00h\nI', set())
    assert name == "a_b_c__d_e_f_g_h_I.png"
    long = safe_filename("猫" * 500, set())
    assert len(long.encode("utf-8")) <= 160
    assert safe_filename("   ...   ", set()) == "image.png"
    assert safe_filename("", set()) == "image.png"


def test_trailing_dots_and_spaces_are_dropped():
    assert safe_filename("report. ", set()) == "report.png"


def test_pattern_is_filled_without_attribute_access():
    assert pattern_fields("{product_name}_{color}") == ["product_name", "color"]
    assert fill_filename_pattern("{product_name}_{color}", {"product_name": "Neon Jacket", "color": "red"}) == (
        "Neon Jacket_red"
    )
    # An empty field leaves no dangling or doubled separator behind.
    assert fill_filename_pattern("{a}_{missing}", {"a": 1}) == "1"
    assert fill_filename_pattern("{a}_{missing}_{b}", {"a": 1, "b": 2}) == "1_2"
    assert fill_filename_pattern("{a} - {b}", {"a": 1, "b": 2}) == "1 - 2"
    # Format-string tricks are plain text here, never evaluated.
    assert fill_filename_pattern("{a.__class__}", {"a": 1}) == "{a.__class__}"


def test_pattern_values_are_the_cells_plus_row_seed_and_batch_id():
    values = pattern_values({"Product Name": "Neon", "productName": "Jacket", "seed": "cell"}, 7, "b-1", 2**64 - 1)
    # Cells are matched as fields are matched to columns (case-folded, inner spaces as "_"); the built-in
    # names win over cells.
    assert values == {"product_name": "Neon", "productname": "Jacket", "seed": 2**64 - 1, "row": 7,
                      "batch_id": "b-1"}
    assert fill_filename_pattern("{ProductName}_{row}_{batch_id}_{seed}", values) == f"Jacket_7_b-1_{2**64 - 1}"
    assert fill_filename_pattern("{product_name}", values) == "Neon"
    assert pattern_values({}, 3, "b-2", None)["seed"] == ""  # no seed yet: empty, never "None"


def test_a_field_name_column_key_folds_still_fills_its_placeholder():
    values = pattern_values({"product__name": "Jacket", "Brand Color": "red"}, 1, "b", 5)
    assert fill_filename_pattern("{product__name}_{brand_color}_{row}", values) == "Jacket_red_1"


def test_row_is_padded_to_the_digits_of_the_batchs_largest_row_number():
    assert row_digits(range(2, 10_002)) == 5 and row_digits([2, 3]) == 1
    assert pattern_values({}, 2, "b", 1, digits=5)["row"] == "00002"
    assert pattern_values({}, 10_001, "b", 1, digits=5)["row"] == "10001"
    assert pattern_values({}, 2, "b", 1)["row"] == 2  # a batch recorded before padding keeps its names
