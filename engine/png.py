"""PNG files from 8-bit pixels and text chunks: the bytes every saved picture is made of.

The default level (1) takes a fast path of its own. Pillow's encoder scores four PNG filters for every
row in scalar C before it compresses the row: on a 1024² picture the scoring alone costs about 60 ms,
more than zlib does, and it runs once per image of a batch on the CPU beside the GPU. The fast path
filters the whole picture at once with the "Up" filter (each row minus the one above, one vectorised
subtraction: what fast encoders such as fpng do) and deflates it with zlib's run-length strategy, which
suits filtered pictures, whose redundancy is runs of small differences rather than repeated strings. On
1024² photographs that takes about 40 % of Pillow's CPU at the same level (25 % on noise), for files
within a few percent of its size (``python app.py bench --png`` prints both side by side). Level 0 stores
the same filtered rows uncompressed.

Levels 2–9 go through Pillow: its per-row filter choice and zlib's full matching are what a user asking
for smaller files pays for. Both paths write the same pixels and the same text chunks, which is what
ComfyUI and this project read back (``prompt`` and ``workflow``).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping

import numpy as np

__all__ = ["FAST_LEVELS", "encode_png", "pillow_png"]

FAST_LEVELS = (0, 1)  # zlib levels written by the vectorised Up-filter path; 2-9 go through Pillow

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)
_UP_FILTER = 2
# Compressed data goes out in IDAT chunks of at most this size: one chunk for any picture this engine makes,
# and well under PNG's 2**31 - 1 byte limit per chunk for the rare giant one.
_IDAT_BYTES = 1 << 26


def encode_png(pixels: np.ndarray, text: Mapping[str, str], compress_level: int) -> bytes:
    """``pixels`` (uint8, [H, W] or [H, W, C] with C in 1-4) as PNG bytes, one text chunk per ``text`` item.

    Text that Latin-1 can hold goes into a tEXt chunk, anything else into a UTF-8 iTXt chunk, as Pillow
    does. ``compress_level`` is zlib's 0-9.
    """
    if pixels.dtype != np.uint8:
        raise ValueError(f"PNG pixels must be uint8, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in _COLOR_TYPES or 0 in pixels.shape:
        raise ValueError(f"PNG pixels must be [height, width, 1-4 channels], got shape {pixels.shape}")
    if not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be a zlib level from 0 to 9, got {compress_level}")
    for key in text:
        _keyword(key)
    if compress_level not in FAST_LEVELS:
        return pillow_png(pixels, text, compress_level)

    height, width, channels = pixels.shape
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
    pieces = [_SIGNATURE, *_chunk(b"IHDR", header)]
    for key, value in text.items():
        pieces.extend(_text_chunk(key, value))
    data = memoryview(_deflate(_up_filtered(pixels), compress_level))
    for start in range(0, len(data), _IDAT_BYTES):
        pieces.extend(_chunk(b"IDAT", data[start : start + _IDAT_BYTES]))
    pieces.extend(_chunk(b"IEND", b""))
    return b"".join(pieces)


def _up_filtered(pixels: np.ndarray) -> np.ndarray:
    """PNG scanlines with filter byte 2 (Up): each row minus the row above it, modulo 256.

    The first row's "row above" is zeros by the PNG specification, so it is stored as it is.
    """
    height = pixels.shape[0]
    rows = np.ascontiguousarray(pixels).reshape(height, -1)
    lines = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    lines[:, 0] = _UP_FILTER
    lines[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=lines[1:, 1:])  # uint8 arithmetic wraps, as PNG's filters do
    return lines


def _deflate(data: np.ndarray, level: int) -> bytes:
    # Run-length matching (distance 1) finds what filtered pictures repeat at a fraction of the cost of
    # zlib's string matching; at level 0 zlib only stores, and the strategy does not matter.
    compressor = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
    return compressor.compress(memoryview(data).cast("B")) + compressor.flush()


def _keyword(key: str) -> bytes:
    """``key`` as a PNG keyword: 1-79 Latin-1 characters, no NUL; anything else is refused."""
    try:
        keyword = key.encode("latin-1")
    except UnicodeEncodeError:
        keyword = b""
    if not 1 <= len(keyword) <= 79 or b"\0" in keyword:
        raise ValueError(f"PNG text keys must be 1-79 Latin-1 characters without NUL, got {key!r}")
    return keyword


def _text_chunk(key: str, value: str) -> list[bytes]:
    keyword = _keyword(key)
    try:
        return _chunk(b"tEXt", keyword + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        # iTXt: keyword, no compression, empty language tag and translated keyword, UTF-8 text
        return _chunk(b"iTXt", keyword + b"\0\0\0\0\0" + value.encode("utf-8"))


def _chunk(kind: bytes, body: bytes | memoryview) -> list[bytes | memoryview]:
    """A PNG chunk as the pieces to join: length, type, body, CRC of type and body."""
    crc = zlib.crc32(body, zlib.crc32(kind))
    return [struct.pack(">I", len(body)), kind, body, struct.pack(">I", crc)]


def pillow_png(pixels: np.ndarray, text: Mapping[str, str], compress_level: int) -> bytes:
    """The same picture and text through Pillow's encoder (per-row filter choice, zlib's default strategy)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()
