"""The PNG writer: what it writes decodes to the same pixels and text in Pillow, at every level."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.png import FAST_LEVELS, encode_png, pillow_png
from engine.png_bench import format_png_table, run_png_benchmark, synthetic_pictures

ROOT = Path(__file__).resolve().parents[1]


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every chunk, checking each CRC on the way."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    found, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        found.append((kind, body))
        at += 12 + length
    return found


@pytest.mark.parametrize("level", [0, 1, 4, 9])
@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 5, 3), (17, 9, 4), (8, 13, 1), (6, 7, 2), (64, 48, 3)])
def test_every_level_and_channel_count_decodes_to_the_same_pixels(shape, level):
    pixels = np.random.default_rng(sum(shape) + level).integers(0, 256, shape, dtype=np.uint8)
    image = decode(encode_png(pixels, {}, level))
    assert image.size == (shape[1], shape[0])
    assert image.mode == {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[shape[2]]
    decoded = np.asarray(image).reshape(shape)
    assert np.array_equal(decoded, pixels)


def test_a_two_dimensional_array_is_a_grey_picture():
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    image = decode(encode_png(pixels, {}, 1))
    assert image.mode == "L" and np.array_equal(np.asarray(image), pixels)


def test_text_chunks_carry_the_metadata_as_pillow_and_comfyui_read_it():
    pixels = np.zeros((4, 4, 3), np.uint8)
    prompt = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 42}}})
    text = {"prompt": prompt, "workflow": json.dumps({"nodes": []}), "note": "Café 日本語 ✓"}
    for level in (1, 6):
        image = decode(encode_png(pixels, text, level))
        assert image.text == text
        assert json.loads(image.text["prompt"])["3"]["inputs"]["seed"] == 42
    kinds = [kind for kind, _ in chunks(encode_png(pixels, text, 1))]
    # Latin-1 text goes into tEXt and the rest into UTF-8 iTXt, as Pillow writes them, all before the data
    assert kinds == [b"IHDR", b"tEXt", b"tEXt", b"iTXt", b"IDAT", b"IEND"]


def test_the_fast_levels_filter_every_row_with_up_and_the_others_use_pillows_choice():
    pixels = synthetic_pictures(size=96)["studio"]
    for level in FAST_LEVELS:
        data = encode_png(pixels, {}, level)
        raw = zlib.decompress(b"".join(body for kind, body in chunks(data) if kind == b"IDAT"))
        lines = np.frombuffer(raw, np.uint8).reshape(96, 1 + 96 * 3)
        assert set(lines[:, 0].tolist()) == {2}
        # Up: each stored row is the picture's row minus the one above it (the first row is stored as is)
        restored = np.cumsum(lines[:, 1:], axis=0, dtype=np.uint8).reshape(pixels.shape)
        assert np.array_equal(restored, pixels)
    assert encode_png(pixels, {"k": "v"}, 4) == pillow_png(pixels, {"k": "v"}, 4)
    stored = encode_png(pixels, {}, 0)
    assert len(stored) > pixels.nbytes  # level 0 stores: no compression at all


def test_the_fast_writer_makes_files_no_larger_than_pillow_at_the_same_level():
    for kind, pixels in synthetic_pictures(size=256).items():
        fast, pillow = encode_png(pixels, {}, 1), pillow_png(pixels, {}, 1)
        assert np.array_equal(np.asarray(decode(fast)), np.asarray(decode(pillow)))
        assert len(fast) <= 1.02 * len(pillow), f"{kind}: {len(fast)} bytes against Pillow's {len(pillow)}"


@pytest.mark.parametrize(("pixels", "text", "level", "message"), [
    (np.zeros((2, 2, 3), np.float32), {}, 1, "must be uint8"),
    (np.zeros((2, 2, 5), np.uint8), {}, 1, r"\[height, width, 1-4 channels\]"),
    (np.zeros((0, 2, 3), np.uint8), {}, 1, r"\[height, width, 1-4 channels\]"),
    (np.zeros((2, 2, 3), np.uint8), {}, 10, "zlib level from 0 to 9"),
    (np.zeros((2, 2, 3), np.uint8), {"": "x"}, 1, "1-79 Latin-1 characters"),
    (np.zeros((2, 2, 3), np.uint8), {"k" * 80: "x"}, 1, "1-79 Latin-1 characters"),
    (np.zeros((2, 2, 3), np.uint8), {"提示": "x"}, 1, "1-79 Latin-1 characters"),
])
def test_bad_input_is_refused_with_what_was_wrong(pixels, text, level, message):
    with pytest.raises(ValueError, match=message):
        encode_png(pixels, text, level)
    if level == 1:  # the Pillow path refuses the same input with the same message
        with pytest.raises(ValueError, match=message):
            encode_png(pixels, text, 6)


def test_compressed_data_over_the_chunk_size_is_split_across_idat_chunks(monkeypatch):
    import engine.png

    monkeypatch.setattr(engine.png, "_IDAT_BYTES", 1000)
    pixels = np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    data = encode_png(pixels, {"prompt": "{}"}, 1)
    sizes = [len(body) for kind, body in chunks(data) if kind == b"IDAT"]
    assert len(sizes) > 5 and max(sizes) == 1000
    assert np.array_equal(np.asarray(decode(data)), pixels)


def test_a_non_contiguous_view_is_written_as_the_picture_it_shows():
    base = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    view = base[::2, 5:25]
    assert np.array_equal(np.asarray(decode(encode_png(view, {}, 1))), view)


def test_png_benchmark_compares_the_writer_with_pillow_on_every_picture():
    report = run_png_benchmark(size=64, repeats=1, echo=False)
    rows = {(r["picture"], r["encoder"]): r for r in report["results"]}
    assert {picture for picture, _ in rows} == {"noise", "studio", "flat"}
    assert all(r["same_pixels"] for r in report["results"])
    assert all(r["cpu_vs_baseline"] in (1.0, None) for (_, encoder), r in rows.items() if encoder == report["baseline"])
    assert all(r["size_vs_baseline"] == 1.0 for (_, encoder), r in rows.items() if encoder == report["baseline"])
    table = format_png_table(report)
    assert "engine, level 1 (default)" in table and "NO" not in table
    report["results"][0]["cpu_vs_baseline"] = None  # a baseline below the clock's resolution
    assert "     -" in format_png_table(report)


def test_bench_png_command_prints_the_table(tmp_path):
    out = tmp_path / "png.json"
    command = [sys.executable, str(ROOT / "app.py"), "bench", "--png", "--size", "64", "--repeats", "1", "--json", str(out)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "PNG encoding, 64² RGB" in done.stdout
    assert len(json.loads(out.read_text())["results"]) == 9
