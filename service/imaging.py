"""Image math for post-processing Replicate outputs: probe, decode, plan, resize, encode.

Pure functions on bytes and numpy arrays; the worker does the fetching and storing (STYLE rule 8).

Decisions, so callers need not guess:

- The format comes from the content's magic bytes (PNG, JPEG, WebP), never from a name or a
  Content-Type, and the output is encoded in the format that came in.
- The header is read and the size checked against ``max_pixels`` before any pixel is decoded, and a
  PNG without its IEND chunk, a JPEG without its EOI marker or a WebP shorter than its RIFF size is
  refused as cut short, even where a decoder would return a partial picture.
- Pixels stay as stored: alpha (BGRA), grayscale (2-D) and 16-bit depth survive decode, resize and
  PNG encode. JPEG is decoded with its EXIF orientation applied, because the re-encoded file carries
  no EXIF and would otherwise show turned; it has no alpha to lose.
- Sizes are rounded to the nearest integer, halves up: 5:7 on a 1920 long side is 1371×1920. A cover
  resize crops the centred region of the target's ratio (to the nearest pixel), then resizes it to the
  exact target size.
- An upscale never makes an image larger than ``max_long_side`` on its long side, and the cap never
  shrinks one: a source already that large is kept as it is. Resize targets are capped the same way.
- Shrinking uses INTER_AREA (it averages, so no aliasing); enlarging uses INTER_CUBIC, or
  INTER_LANCZOS4 when the spec asks for ``"quality": "high"``. BGRA is resized with colour weighted by
  alpha, so the colour hidden under transparent pixels cannot bleed into the edges.
- JPEG cannot hold alpha: BGRA going into JPEG is composited on white. 16-bit going into JPEG or WebP
  is scaled to 8-bit (65535 → 255, rounded), never truncated.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from service.errors import ConfigError, ServiceError

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_FORMATS = {media: fmt for fmt, media in MEDIA_TYPES.items()}
# Output sizes for the ratios pages use most; any other ratio gets ImagingSettings.resize_long_side.
PRESETS: dict[tuple[int, int], tuple[int, int]] = {
    (3, 4): (1080, 1440), (9, 16): (1080, 1920), (16, 9): (1920, 1080)}
INTERPOLATIONS = {"area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC, "lanczos4": cv2.INTER_LANCZOS4}
# JPEG without IMREAD_UNCHANGED so that EXIF orientation is applied; ANYCOLOR keeps grayscale.
_READ_FLAGS = {"png": cv2.IMREAD_UNCHANGED, "webp": cv2.IMREAD_UNCHANGED,
               "jpeg": cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH}
_RATIO = re.compile(r"([0-9]{1,5}):([0-9]{1,5})")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (C4 DHT, C8 JPG and CC DAC are not frames).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class InvalidAspectRatio(ServiceError):
    """The aspect ratio must be "W:H" of positive whole numbers."""

    code = "invalid_aspect_ratio"
    status = 400
    transient = False


class InvalidPostprocess(ServiceError):
    """The postprocess spec is not understood."""

    code = "invalid_postprocess"
    status = 400
    transient = False


class ImageError(ServiceError):
    """The image could not be processed."""

    code = "image_error"
    status = 422
    # The same bytes fail the same way: the worker gives up at once instead of retrying.
    transient = False


class NotAnImage(ImageError):
    """Content is not a PNG, JPEG or WebP image."""

    code = "not_an_image"


class CorruptImage(ImageError):
    """The image is truncated or corrupt."""

    code = "corrupt_image"


class ImageTooLarge(ImageError):
    """The image has more pixels than allowed."""

    code = "image_too_large"
    status = 413


# Flask config key, field, type, lowest and highest allowed value. WebP cannot exceed 16383 a side.
_SETTINGS = (
    ("IMAGE_UPSCALE_FACTOR", "upscale_factor", float, 1, 16),
    ("IMAGE_MAX_LONG_SIDE", "max_long_side", int, 16, 16383),
    ("IMAGE_RESIZE_LONG_SIDE", "resize_long_side", int, 16, 16383),
    ("IMAGE_JPEG_QUALITY", "jpeg_quality", int, 1, 100),
    ("IMAGE_WEBP_QUALITY", "webp_quality", int, 1, 100),
    ("IMAGE_PNG_COMPRESSION", "png_compression", int, 0, 9),
    ("IMAGE_MAX_PIXELS", "max_pixels", int, 1, 1 << 30),
)


@dataclass(frozen=True)
class ImagingSettings:
    upscale_factor: float = 2.0
    max_long_side: int = 4096
    resize_long_side: int = 1920
    jpeg_quality: int = 92
    webp_quality: int = 90
    png_compression: int = 3
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        for key, name, _, low, high in _SETTINGS:
            if not low <= getattr(self, name) <= high:
                raise ConfigError(f"{key} must be between {low} and {high}, not {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ImagingSettings:
        """Settings from the IMAGE_* keys of a Flask config; a key that is absent keeps its default."""
        values: dict[str, Any] = {}
        for key, name, kind, _, _ in _SETTINGS:
            if config.get(key) is not None:
                try:
                    values[name] = kind(config[key])
                except (TypeError, ValueError):
                    raise ConfigError(f"{key} must be a {kind.__name__}, not {config[key]!r}") from None
        return cls(**values)

    def encoding(self) -> dict[str, int]:
        """The keyword arguments of encode()."""
        return {"jpeg_quality": self.jpeg_quality, "webp_quality": self.webp_quality,
                "png_compression": self.png_compression}


DEFAULTS = ImagingSettings()


@dataclass(frozen=True, eq=False)
class Image:
    """Decoded pixels (BGR, BGRA or 2-D gray; uint8 or uint16) and the format they came in."""

    pixels: np.ndarray
    format: str


@dataclass(frozen=True)
class Plan:
    """Crop (x, y, w, h) of the source, or None for all of it, then resize to width × height."""

    action: str  # "keep", "upscale" or "resize"
    width: int
    height: int
    crop: tuple[int, int, int, int] | None = None
    interpolation: str | None = None  # a key of INTERPOLATIONS; None when nothing is resampled

    @property
    def is_identity(self) -> bool:
        """True when applying the plan returns the pixels unchanged."""
        return self.crop is None and self.interpolation is None


@dataclass(frozen=True, eq=False)
class Processed:
    data: bytes
    format: str
    plan: Plan


def parse_aspect_ratio(text: object) -> tuple[int, int]:
    """ "W:H" of positive whole numbers, reduced: "16:9" → (16, 9), "1024:1024" → (1, 1)."""
    match = _RATIO.fullmatch(text) if isinstance(text, str) else None
    width, height = (int(part) for part in match.groups()) if match else (0, 0)
    if width < 1 or height < 1:
        raise InvalidAspectRatio(f'aspect ratio must be "W:H" of positive whole numbers, not {text!r:.40}')
    divisor = math.gcd(width, height)
    return width // divisor, height // divisor


def media_type(head: bytes) -> str | None:
    """The image type the magic bytes announce (PNG, JPEG, WebP or GIF), or None."""
    if head.startswith(_PNG_MAGIC):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def sniff(data: bytes) -> str:
    """The format named by the content's magic bytes, whatever the file is called; only
    the formats this module decodes."""
    fmt = _FORMATS.get(media_type(data) or "")
    if fmt is None:
        raise NotAnImage()
    return fmt


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise CorruptImage("the PNG has no IHDR header")
    pos = 8
    while pos + 12 <= len(data):  # walk the chunks: cheap, and finds a file cut short
        length, kind = struct.unpack_from(">I4s", data, pos)
        pos += 12 + length
        if kind == b"IEND":
            return struct.unpack_from(">II", data, 16)
    raise CorruptImage("the PNG is cut short: it has no IEND chunk")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos, size = 2, None
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xD9:  # end of image before any scan
            break
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte or no payload
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == 0xDA:  # start of scan; EOI cannot occur inside entropy-coded data
            if size is None or data.rfind(b"\xff\xd9") < pos:
                break
            return size
        if marker in _JPEG_SOF and size is None and pos + 9 <= len(data):
            height, width = struct.unpack_from(">HH", data, pos + 5)
            size = (width, height)
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    raise CorruptImage("the JPEG is cut short or corrupt: no frame header, scan and EOI marker")


def _webp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 30 or len(data) < struct.unpack_from("<I", data, 4)[0] + 8:
        raise CorruptImage("the WebP is cut short: it is shorter than its RIFF header says")
    kind = data[12:16]
    if kind == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if kind == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    raise CorruptImage("the WebP has no VP8, VP8L or VP8X header")


_HEADERS = {"png": _png_size, "jpeg": _jpeg_size, "webp": _webp_size}


def probe(data: bytes) -> tuple[str, int, int]:
    """Format, width and height from the header alone; refuses content that is cut short."""
    fmt = sniff(data)
    width, height = _HEADERS[fmt](data)
    if width < 1 or height < 1:
        raise CorruptImage(f"the {fmt.upper()} header gives an empty size, {width}×{height}")
    return fmt, width, height


def decode(data: bytes, max_pixels: int = DEFAULTS.max_pixels) -> Image:
    """The pixels, refused before decoding when the header gives more than max_pixels (a bomb guard)."""
    fmt, width, height = probe(data)
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}×{height} ({width * height / 1e6:.1f} megapixels); "
                            f"the limit is {max_pixels / 1e6:.1f} megapixels")
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), _READ_FLAGS[fmt])
    except cv2.error:
        pixels = None
    if pixels is None or pixels.size == 0:
        raise CorruptImage(f"the {fmt.upper()} data could not be decoded")
    return Image(pixels, fmt)


def size_of(pixels: np.ndarray) -> tuple[int, int]:
    """(width, height) of an array shaped (height, width[, channels])."""
    return pixels.shape[1], pixels.shape[0]


def _scaled(n: int, num: int, den: int) -> int:
    """n·num/den rounded to the nearest integer, halves up, and at least 1."""
    return max(1, (2 * n * num + den) // (2 * den))


def _fit_long_side(ratio: tuple[int, int], long_side: int) -> tuple[int, int]:
    width, height = ratio
    if width >= height:
        return long_side, _scaled(long_side, height, width)
    return _scaled(long_side, width, height), long_side


def _capped(size: tuple[int, int], max_long_side: int) -> tuple[int, int]:
    return size if max(size) <= max_long_side else _fit_long_side(size, max_long_side)


def _numbers(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's sizes and scale, checked again here because a replayed event skipped the API schema."""
    found = {k: spec[k] for k in ("width", "height", "long_side", "scale") if spec.get(k) is not None}
    for key, value in found.items():
        whole = key != "scale"
        if (isinstance(value, bool) or not isinstance(value, int if whole else int | float)
                or not 0 < value < math.inf):
            kind = "whole number" if whole else "number"
            raise InvalidPostprocess(f"postprocess {key} must be a positive {kind}, not {value!r:.40}")
    return found


def _interpolation(crop: tuple[int, int], target: tuple[int, int], high: bool) -> str | None:
    if crop == target:
        return None
    if target[0] * target[1] < crop[0] * crop[1]:
        return "area"
    return "lanczos4" if high else "cubic"


def _cover(action: str, source: tuple[int, int], shape: tuple[int, int], target: tuple[int, int],
           high: bool) -> Plan:
    """Crop the centred region of shape's ratio, then resize it to the target.

    The shape is the ratio asked for, not the target size: 9:16 on a 1000 long side is 563×1000,
    and a 900×1600 source is already 9:16, so it is scaled, not trimmed by a row.
    """
    (sw, sh), (rw, rh) = source, shape
    if sw * rh > sh * rw:  # the source is wider than the shape: trim the sides
        cw, ch = min(sw, _scaled(sh, rw, rh)), sh
    else:
        cw, ch = sw, min(sh, _scaled(sw, rh, rw))
    crop = None if (cw, ch) == source else ((sw - cw) // 2, (sh - ch) // 2, cw, ch)
    return Plan(action, *target, crop, _interpolation((cw, ch), target, high))


def _factor(given: dict[str, Any], source: tuple[int, int], settings: ImagingSettings) -> float:
    if "scale" in given:
        return given["scale"]
    if "long_side" in given:
        return given["long_side"] / max(source)
    if "width" in given:
        return given["width"] / source[0]
    if "height" in given:
        return given["height"] / source[1]
    return settings.upscale_factor


def _upscale(given: dict[str, Any], source: tuple[int, int], settings: ImagingSettings, high: bool) -> Plan:
    if "width" in given and "height" in given:
        shape = (given["width"], given["height"])
        return _cover("upscale", source, shape, _capped(shape, settings.max_long_side), high)
    # Capped at max_long_side, but the cap never shrinks an image.
    factor = min(_factor(given, source, settings), max(1.0, settings.max_long_side / max(source)))
    target = (max(1, math.floor(source[0] * factor + 0.5)), max(1, math.floor(source[1] * factor + 0.5)))
    return Plan("upscale", *target, None, _interpolation(source, target, high))


def _resize_target(given: dict[str, Any], ratio: tuple[int, int],
                   settings: ImagingSettings) -> tuple[int, int]:
    if "width" in given and "height" in given:
        return given["width"], given["height"]
    if "width" in given:
        return given["width"], _scaled(given["width"], ratio[1], ratio[0])
    if "height" in given:
        return _scaled(given["height"], ratio[0], ratio[1]), given["height"]
    if "long_side" not in given and ratio in PRESETS:
        return PRESETS[ratio]
    return _fit_long_side(ratio, given.get("long_side", settings.resize_long_side))


def plan(postprocess: Mapping[str, Any] | None, aspect_ratio: str, source: tuple[int, int],
         settings: ImagingSettings = DEFAULTS) -> Plan:
    """What to do to a source of (width, height), given the job's postprocess spec and aspect ratio.

    auto: upscale when the ratio is 1:1, else resize; upscale: scale by `scale`, or to `long_side`,
    `width` or `height` (both: cover to that size), else by the upscale factor; resize: cover to
    width × height, or the ratio's preset size, or the ratio on `long_side`; none: keep as is.
    """
    spec = postprocess or {}
    mode = spec.get("mode", "auto")
    if mode == "none":
        return Plan("keep", *source)
    ratio = parse_aspect_ratio(aspect_ratio)
    given, high = _numbers(spec), spec.get("quality") == "high"
    if mode == "auto":
        mode = "upscale" if ratio == (1, 1) else "resize"
    if mode == "upscale":
        return _upscale(given, source, settings, high)
    if mode == "resize":
        shape = (given["width"], given["height"]) if "width" in given and "height" in given else ratio
        target = _capped(_resize_target(given, ratio, settings), settings.max_long_side)
        return _cover("resize", source, shape, target, high)
    raise InvalidPostprocess(f"postprocess mode must be auto, upscale, resize or none, not {mode!r:.40}")


def _resize_premultiplied(image: np.ndarray, size: tuple[int, int], flag: int) -> np.ndarray:
    """Resize BGRA with colour weighted by alpha, so colour under transparent pixels cannot bleed in."""
    top = float(np.iinfo(image.dtype).max)
    work = image.astype(np.float32)
    work[..., :3] *= work[..., 3:] / top
    out = np.clip(cv2.resize(work, size, interpolation=flag), 0.0, top)
    alpha = out[..., 3:] / top
    np.divide(out[..., :3], alpha, out=out[..., :3], where=alpha > 0)
    return np.rint(np.clip(out, 0.0, top)).astype(image.dtype)


def resize(image: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize to (width, height) with an interpolation named in INTERPOLATIONS; dtype and channels kept."""
    flag = INTERPOLATIONS[interpolation]
    if image.ndim == 3 and image.shape[2] == 4:
        return _resize_premultiplied(image, size, flag)
    return cv2.resize(image, size, interpolation=flag)


def apply(image: np.ndarray, plan: Plan) -> np.ndarray:
    """The pixels the plan asks for."""
    if plan.crop is not None:
        x, y, w, h = plan.crop
        image = image[y:y + h, x:x + w]
    if plan.interpolation is None:
        return image
    return resize(image, (plan.width, plan.height), plan.interpolation)


def to_8bit(image: np.ndarray) -> np.ndarray:
    """uint16 scaled to uint8 (65535 → 255, rounded), never truncated; uint8 as it is."""
    if image.dtype != np.uint16:
        return image
    return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)


def flatten_alpha(image: np.ndarray) -> np.ndarray:
    """BGRA composited on white, as BGR of the same dtype; anything else as it is."""
    if image.ndim != 3 or image.shape[2] != 4:
        return image
    top = float(np.iinfo(image.dtype).max)
    alpha = image[..., 3:].astype(np.float32) / top
    return np.rint(image[..., :3] * alpha + top * (1.0 - alpha)).astype(image.dtype)


def encode(image: np.ndarray, fmt: str, *, jpeg_quality: int = 92, webp_quality: int = 90,
           png_compression: int = 3) -> bytes:
    """The pixels as a PNG, JPEG or WebP file."""
    if fmt == "png":
        ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, png_compression]
    elif fmt == "jpeg":
        image, ext, params = to_8bit(flatten_alpha(image)), ".jpg", [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    elif fmt == "webp":
        image, ext, params = to_8bit(image), ".webp", [cv2.IMWRITE_WEBP_QUALITY, webp_quality]
    else:
        raise ImageError(f"cannot encode as {fmt!r:.40}; use png, jpeg or webp")
    ok, buffer = cv2.imencode(ext, image, params)
    if not ok:
        raise ImageError(f"the image could not be encoded as {fmt.upper()}")
    return buffer.tobytes()


def process(data: bytes, postprocess: Mapping[str, Any] | None, aspect_ratio: str,
            settings: ImagingSettings = DEFAULTS) -> Processed:
    """Decode, plan, apply and encode in the format that came in; bytes needing no change come back as is."""
    image = decode(data, settings.max_pixels)
    todo = plan(postprocess, aspect_ratio, size_of(image.pixels), settings)
    if todo.is_identity:  # no re-encoding, so no generation loss
        return Processed(data, image.format, todo)
    data = encode(apply(image.pixels, todo), image.format, **settings.encoding())
    return Processed(data, image.format, todo)
