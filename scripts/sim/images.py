"""Generated PNG outputs whose pixel size follows the requested aspect ratio."""

from __future__ import annotations

import re
import struct
import zlib

LONG_SIDE = 1024
RATIO = re.compile(r"^\s*(\d{1,5})\s*:\s*(\d{1,5})\s*$")


def parse_ratio(text: object) -> tuple[int, int] | None:
    """'16:9' -> (16, 9); None when the text is not a positive W:H ratio."""
    match = RATIO.match(text) if isinstance(text, str) else None
    if not match:
        return None
    width, height = int(match[1]), int(match[2])
    return (width, height) if width > 0 and height > 0 else None


def _multiple_of_8(value: float) -> int:
    return max(8, round(value / 8) * 8)


def size_for_ratio(width: int, height: int, long_side: int = LONG_SIDE) -> tuple[int, int]:
    """Pixel (width, height): the long side is long_side, the short one a multiple of 8."""
    if width >= height:
        return long_side, _multiple_of_8(long_side * height / width)
    return _multiple_of_8(long_side * width / height), long_side


def output_size(model_input: dict) -> tuple[int, int]:
    """What a text-to-image model would render for this input: aspect_ratio, else width/height."""
    ratio = parse_ratio(model_input.get("aspect_ratio"))
    if ratio:
        return size_for_ratio(*ratio)
    width, height = model_input.get("width"), model_input.get("height")
    if isinstance(width, int) and isinstance(height, int):
        return width, height
    return LONG_SIDE, LONG_SIDE


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _pixels(width: int, height: int, tint: int) -> bytes:
    """Filter-0 RGB scanlines: red runs left to right, green top to bottom, blue is the tint."""
    row = bytearray(width * 3)
    row[0::3] = bytes(x * 255 // max(1, width - 1) for x in range(width))
    row[2::3] = bytes([tint % 256]) * width
    raw = bytearray()
    for y in range(height):
        row[1::3] = bytes([y * 255 // max(1, height - 1)]) * width
        raw += b"\x00" + row
    return bytes(raw)


def png(width: int, height: int, tint: int = 0) -> bytes:
    """An 8-bit RGB PNG of the given size (pure Python: zlib and struct only)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(_pixels(width, height, tint), 6)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
