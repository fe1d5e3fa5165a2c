"""Image math on real images made here: arrays encoded with OpenCV, and hand-built headers for bombs."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from service import imaging
from service.errors import ConfigError, ServiceError
from service.imaging import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    ImagingSettings,
    InvalidAspectRatio,
    InvalidPostprocess,
    NotAnImage,
    Plan,
    apply,
    decode,
    encode,
    parse_aspect_ratio,
    plan,
    probe,
    process,
)

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}
EXT = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def make(width: int, height: int, channels: int = 3, dtype: type = np.uint8) -> np.ndarray:
    """A smooth gradient, so lossy codecs and interpolation stay predictable."""
    top = np.iinfo(dtype).max
    ramp = np.linspace(0, top, width, dtype=np.float64)[None, :] * np.linspace(0.2, 1, height)[:, None]
    gray = ramp.astype(dtype)
    return gray if channels == 1 else np.dstack([gray] * channels)


def encoded(pixels: np.ndarray, fmt: str, *params: int) -> bytes:
    ok, buffer = cv2.imencode(EXT[fmt], pixels, list(params))
    assert ok
    return buffer.tobytes()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def handmade_png(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit grayscale PNG built byte by byte, so its header can claim any size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (MAGIC["png"] + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


# -- aspect ratios ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "ratio"), [
    ("1:1", (1, 1)), ("16:9", (16, 9)), ("9:16", (9, 16)), ("4:6", (2, 3)), ("1024:1024", (1, 1)),
    ("1920:1080", (16, 9)), ("5:7", (5, 7)),
])
def test_parse_aspect_ratio(text: str, ratio: tuple[int, int]) -> None:
    assert parse_aspect_ratio(text) == ratio


@pytest.mark.parametrize("text", [
    "", "16", "16x9", "16/9", "0:1", "1:0", "-1:2", "1.5:1", " 16:9", "16:9 ", "16:9:1", "a:b",
    "١:١", "123456:1", None, 169, (16, 9),
])
def test_parse_aspect_ratio_refuses(text: object) -> None:
    with pytest.raises(InvalidAspectRatio, match="W:H") as caught:
        parse_aspect_ratio(text)
    assert caught.value.code == "invalid_aspect_ratio" and caught.value.status == 400


# -- sniffing, headers, decoding -------------------------------------------------------------------------

@pytest.mark.parametrize(("fmt", "params"), [
    ("png", ()), ("jpeg", ()),
    ("webp", (cv2.IMWRITE_WEBP_QUALITY, 80)), ("webp", (cv2.IMWRITE_WEBP_QUALITY, 101)),
])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_probe_reads_the_size_from_the_header(fmt: str, params: tuple[int, ...], channels: int) -> None:
    data = encoded(make(123, 45, channels), fmt, *params)  # lossy VP8, lossless VP8L, VP8X with alpha
    assert probe(data) == (fmt, 123, 45)


def test_format_comes_from_the_content_not_the_name() -> None:
    html = b"<!doctype html><html><body>Not found</body></html>"
    for data in (html, b"", b"GIF89a\x01\x00\x01\x00", b"RIFF\x00\x00\x00\x00WAVEfmt "):
        with pytest.raises(NotAnImage) as caught:
            decode(data)
        assert str(caught.value) == "Content is not a PNG, JPEG or WebP image."
        assert isinstance(caught.value, ImageError | ServiceError)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_images_are_corrupt(fmt: str, keep: float) -> None:
    data = encoded(make(200, 150), fmt)
    with pytest.raises(CorruptImage):
        decode(data[: int(len(data) * keep)])


def test_truncated_progressive_jpeg_is_corrupt() -> None:
    # A progressive JPEG cut after its first scans still decodes to a blurry picture in most decoders.
    data = encoded(make(256, 256), "jpeg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    cut = data[: data.rfind(b"\xff\xda")]
    assert cv2.imdecode(np.frombuffer(cut + b"\xff\xd9", np.uint8), cv2.IMREAD_UNCHANGED) is not None
    with pytest.raises(CorruptImage):
        decode(cut)


def test_damaged_png_is_corrupt() -> None:
    data = bytearray(encoded(make(64, 64), "png"))
    start = data.find(b"IDAT") + 4
    data[start:start + 20] = bytes(20)  # keeps the chunk layout, breaks the zlib stream and the CRC
    with pytest.raises(CorruptImage):
        decode(bytes(data))


def test_bomb_header_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object) -> None:
        raise AssertionError("decoded a bomb")

    monkeypatch.setattr(imaging.cv2, "imdecode", never)
    with pytest.raises(ImageTooLarge, match="50000×50000") as caught:
        decode(handmade_png(50_000, 50_000, zlib.compress(b"\0" * 1000)))
    assert caught.value.code == "image_too_large"


def test_highly_compressible_png_is_refused() -> None:
    width, height = 8000, 6000  # 48 megapixels in about 50 KB
    data = handmade_png(width, height, zlib.compress(bytes((width + 1) * height), 9))
    assert len(data) < 100_000
    with pytest.raises(ImageTooLarge):
        decode(data)
    with pytest.raises(ImageTooLarge):
        decode(encoded(make(100, 100), "jpeg"), max_pixels=9_999)
    assert decode(encoded(make(100, 100), "jpeg"), max_pixels=10_000).pixels.shape == (100, 100, 3)


def test_decode_keeps_alpha_gray_and_depth() -> None:
    assert decode(encoded(make(40, 30, 4), "png")).pixels.shape == (30, 40, 4)
    assert decode(encoded(make(40, 30, 4), "webp")).pixels.shape == (30, 40, 4)
    assert decode(encoded(make(40, 30, 1), "png")).pixels.shape == (30, 40)
    assert decode(encoded(make(40, 30, 1), "jpeg")).pixels.shape == (30, 40)
    deep = decode(encoded(make(40, 30, 3, np.uint16), "png"))
    assert deep.pixels.dtype == np.uint16 and deep.pixels.max() > 255 and deep.format == "png"


def test_jpeg_exif_orientation_is_applied() -> None:
    # The re-encoded file carries no EXIF, so a turned photo must be turned in its pixels.
    data = encoded(make(80, 40), "jpeg")
    tiff = b"MM\x00*\x00\x00\x00\x08" + struct.pack(">HHHIHHI", 1, 0x0112, 3, 1, 6, 0, 0)
    app1 = b"Exif\x00\x00" + tiff
    rotated = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    assert probe(rotated) == ("jpeg", 80, 40)
    assert decode(rotated).pixels.shape == (80, 40, 3)


# -- planning --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ratio", "source", "size"), [
    ("1:1", (1024, 1024), (2048, 2048)),
    ("1:1", (512, 512), (1024, 1024)),
    ("1:1", (3000, 3000), (4096, 4096)),  # capped at the long side
    ("1:1", (5000, 5000), (5000, 5000)),  # the cap never shrinks
    ("1:1", (1000, 800), (2000, 1600)),  # a model that ignored the ratio: upscaled as it is
    ("3:4", (1024, 1024), (1080, 1440)),
    ("3:4", (896, 1152), (1080, 1440)),
    ("9:16", (768, 1344), (1080, 1920)),
    ("9:16", (1920, 1080), (1080, 1920)),
    ("9:16", (2160, 3840), (1080, 1920)),
    ("16:9", (1344, 768), (1920, 1080)),
    ("16:9", (1024, 1024), (1920, 1080)),
    ("5:7", (1000, 1000), (1371, 1920)),  # 1920·5/7 = 1371.43
    ("7:5", (1000, 1000), (1920, 1371)),
    ("2:3", (832, 1216), (1280, 1920)),
])
def test_auto_plans_exact_sizes(ratio: str, source: tuple[int, int], size: tuple[int, int]) -> None:
    todo = plan({"mode": "auto"}, ratio, source)
    assert (todo.width, todo.height) == size
    assert todo.action == ("upscale" if ratio == "1:1" else "resize")


@pytest.mark.parametrize(("ratio", "source", "size"), [
    ("1:1", (1024, 1024), (2048, 2048)),
    ("1:1", (3000, 2000), (4096, 2731)),
    ("3:4", (1024, 1024), (1080, 1440)),
    ("9:16", (768, 1344), (1080, 1920)),
    ("9:16", (1920, 1080), (1080, 1920)),
    ("16:9", (1344, 768), (1920, 1080)),
    ("5:7", (700, 1100), (1371, 1920)),
])
def test_applied_plans_give_exact_sizes(ratio: str, source: tuple[int, int], size: tuple[int, int]) -> None:
    out = apply(make(*source), plan(None, ratio, source))
    assert out.shape == (size[1], size[0], 3)


def test_cover_keeps_the_centre() -> None:
    source = np.zeros((1080, 1920, 3), np.uint8)
    source[:, :200] = (255, 0, 0)  # blue bands at the sides must be cropped away
    source[:, -200:] = (255, 0, 0)
    source[490:590, 910:1010] = (0, 0, 255)  # a red marker in the centre must survive
    todo = plan({"mode": "resize"}, "9:16", (1920, 1080))
    assert todo.crop == (656, 0, 608, 1080)
    out = apply(source, todo)
    assert out.shape == (1920, 1080, 3)
    assert tuple(out[960, 540]) == (0, 0, 255)
    assert out[..., 0].max() == 0  # no blue anywhere


@pytest.mark.parametrize(("spec", "ratio", "source", "expected"), [
    ({"mode": "none"}, "16:9", (640, 480), Plan("keep", 640, 480)),
    ({"mode": "none"}, "not a ratio", (640, 480), Plan("keep", 640, 480)),
    ({"mode": "upscale"}, "9:16", (600, 800), Plan("upscale", 1200, 1600, None, "cubic")),
    ({"mode": "upscale", "scale": 3}, "1:1", (500, 500), Plan("upscale", 1500, 1500, None, "cubic")),
    ({"mode": "upscale", "scale": 1.5}, "1:1", (333, 333), Plan("upscale", 500, 500, None, "cubic")),
    ({"mode": "upscale", "long_side": 1500}, "1:1", (1000, 500), Plan("upscale", 1500, 750, None, "cubic")),
    ({"mode": "upscale", "width": 1500}, "1:1", (1000, 500), Plan("upscale", 1500, 750, None, "cubic")),
    ({"mode": "upscale", "height": 1000}, "1:1", (1000, 500), Plan("upscale", 2000, 1000, None, "cubic")),
    ({"mode": "upscale", "scale": 10}, "1:1", (1000, 500), Plan("upscale", 4096, 2048, None, "cubic")),
    ({"mode": "upscale", "width": 2000, "height": 1000}, "1:1", (1000, 1000),
     Plan("upscale", 2000, 1000, (0, 250, 1000, 500), "cubic")),
    ({"mode": "resize"}, "1:1", (1000, 1000), Plan("resize", 1920, 1920, None, "cubic")),
    ({"mode": "resize", "width": 800}, "4:3", (1000, 1000),
     Plan("resize", 800, 600, (0, 125, 1000, 750), "area")),
    ({"mode": "resize", "height": 700}, "5:7", (1000, 1400), Plan("resize", 500, 700, None, "area")),
    ({"mode": "resize", "long_side": 1000}, "9:16", (900, 1600), Plan("resize", 563, 1000, None, "area")),
    ({"mode": "resize", "width": 300, "height": 200}, "1:1", (600, 600),
     Plan("resize", 300, 200, (0, 100, 600, 400), "area")),
    ({"mode": "resize", "width": 8000, "height": 8000}, "1:1", (600, 600),
     Plan("resize", 4096, 4096, None, "cubic")),
    ({"mode": "resize", "width": 8000, "height": 6000}, "1:1", (800, 800),
     Plan("resize", 4096, 3072, (0, 100, 800, 600), "cubic")),
    ({"mode": "resize"}, "9:16", (1080, 1920), Plan("resize", 1080, 1920)),
    ({"mode": "resize", "quality": "high"}, "9:16", (540, 960), Plan("resize", 1080, 1920, None, "lanczos4")),
    ({"mode": "resize", "quality": "high"}, "9:16", (2160, 3840), Plan("resize", 1080, 1920, None, "area")),
    (None, "1:1", (1024, 1024), Plan("upscale", 2048, 2048, None, "cubic")),
])
def test_plan_for_each_mode(spec: dict | None, ratio: str, source: tuple[int, int], expected: Plan) -> None:
    assert plan(spec, ratio, source) == expected


def test_plan_follows_settings() -> None:
    settings = ImagingSettings(upscale_factor=3, max_long_side=2000, resize_long_side=1000)
    assert plan({}, "1:1", (500, 500), settings) == Plan("upscale", 1500, 1500, None, "cubic")
    assert plan({}, "1:1", (1000, 1000), settings) == Plan("upscale", 2000, 2000, None, "cubic")
    assert plan({}, "2:1", (1000, 500), settings) == Plan("resize", 1000, 500)
    assert plan({}, "9:16", (540, 960), settings).height == 1920  # presets are fixed sizes


@pytest.mark.parametrize("spec", [
    {"mode": "stretch"}, {"mode": "resize", "width": 0}, {"mode": "resize", "width": 10.5},
    {"mode": "resize", "width": "800"}, {"mode": "upscale", "scale": -2}, {"mode": "upscale", "scale": True},
    {"mode": "upscale", "scale": float("inf")}, {"mode": "upscale", "scale": float("nan")},
])
def test_plan_refuses_a_bad_spec(spec: dict) -> None:
    with pytest.raises(InvalidPostprocess):
        plan(spec, "1:1", (100, 100))


def test_plan_refuses_a_bad_ratio() -> None:
    with pytest.raises(InvalidAspectRatio):
        plan({"mode": "auto"}, "wide", (100, 100))


# -- resizing --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "source", "flag"), [
    ({"mode": "upscale"}, (200, 200), cv2.INTER_CUBIC),
    ({"mode": "upscale", "quality": "high"}, (200, 200), cv2.INTER_LANCZOS4),
    ({"mode": "resize", "width": 50, "height": 50}, (200, 200), cv2.INTER_AREA),
    ({"mode": "resize", "width": 50, "height": 50, "quality": "high"}, (200, 200), cv2.INTER_AREA),
])
def test_interpolation_choice(spec: dict, source: tuple[int, int], flag: int) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (source[1], source[0], 3), dtype=np.uint8)
    todo = plan(spec, "1:1", source)
    expected = cv2.resize(pixels, (todo.width, todo.height), interpolation=flag)
    assert np.array_equal(apply(pixels, todo), expected)


def test_alpha_survives_and_transparent_colour_does_not_bleed() -> None:
    pixels = np.zeros((100, 100, 4), np.uint8)
    pixels[..., 1] = 255  # green under the transparent area, as some matting models leave it
    pixels[30:70, 30:70] = (0, 0, 255, 255)  # an opaque red square
    result = process(encoded(pixels, "png"), {"mode": "auto"}, "1:1")
    out = decode(result.data).pixels
    assert out.shape == (200, 200, 4) and result.format == "png"
    assert out[:40, :].max() == 0 and out[160:, :].max() == 0  # transparent stays transparent, colour too
    assert tuple(out[100, 100]) == (0, 0, 255, 255)
    assert out[out[..., 3] > 0][:, 1].max() <= 2  # no green fringe around the square


def test_gray_and_16_bit_survive_resizing() -> None:
    gray = decode(process(encoded(make(300, 400, 1), "png"), {"mode": "auto"}, "9:16").data).pixels
    assert gray.shape == (1920, 1080) and gray.dtype == np.uint8
    deep = make(300, 400, 3, np.uint16)
    out = decode(process(encoded(deep, "png"), {"mode": "auto"}, "3:4").data).pixels
    assert out.shape == (1440, 1080, 3) and out.dtype == np.uint16 and out.max() > 60000
    deep_alpha = make(64, 64, 4, np.uint16)
    out = decode(process(encoded(deep_alpha, "png"), None, "1:1").data).pixels
    assert out.shape == (128, 128, 4) and out.dtype == np.uint16


# -- encoding --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_output_format_follows_input(fmt: str) -> None:
    result = process(encoded(make(300, 200), fmt), {"mode": "auto"}, "16:9")
    assert result.format == fmt and result.data.startswith(MAGIC[fmt])
    assert probe(result.data) == (fmt, 1920, 1080)


def test_unchanged_output_is_returned_as_is() -> None:
    data = encoded(make(1080, 1920), "jpeg")
    result = process(data, {"mode": "resize"}, "9:16")
    assert result.data is data and result.plan.is_identity
    assert process(data, {"mode": "none"}, "1:1").data is data


def test_16_bit_into_8_bit_formats_is_scaled_not_truncated() -> None:
    half = np.full((32, 32, 3), 32896, np.uint16)  # 128·257
    for fmt in ("jpeg", "webp"):
        out = decode(encode(half, fmt)).pixels
        assert out.dtype == np.uint8 and abs(int(out.mean()) - 128) <= 1
    assert imaging.to_8bit(np.array([0, 128, 129, 32896, 65535], np.uint16)).tolist() == [0, 0, 1, 128, 255]


def test_alpha_into_jpeg_is_composited_on_white() -> None:
    pixels = np.zeros((32, 64, 4), np.uint8)
    pixels[:, 32:] = (0, 0, 255, 255)  # opaque red on the right, transparent black on the left
    out = decode(encode(pixels, "jpeg")).pixels
    assert out.shape == (32, 64, 3)
    assert out[:, :24].min() >= 250 and out[16, 48, 2] >= 240 and out[16, 48, 0] <= 15


def test_encode_options() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert len(encode(pixels, "jpeg", jpeg_quality=30)) < len(encode(pixels, "jpeg", jpeg_quality=95))
    assert len(encode(pixels, "webp", webp_quality=30)) < len(encode(pixels, "webp", webp_quality=95))
    smooth = make(256, 256)
    assert len(encode(smooth, "png", png_compression=9)) < len(encode(smooth, "png", png_compression=0))
    with pytest.raises(ImageError, match="gif"):
        encode(pixels, "gif")


# -- settings --------------------------------------------------------------------------------------------

def test_settings_from_config() -> None:
    assert ImagingSettings.from_config({}) == ImagingSettings()
    settings = ImagingSettings.from_config({
        "IMAGE_UPSCALE_FACTOR": "1.5", "IMAGE_MAX_LONG_SIDE": 2048, "IMAGE_RESIZE_LONG_SIDE": "1280",
        "IMAGE_JPEG_QUALITY": 80, "IMAGE_WEBP_QUALITY": 75, "IMAGE_PNG_COMPRESSION": 6,
        "IMAGE_MAX_PIXELS": 1_000_000, "IMAGE_JPEG_QUALITY_UNUSED": "ignored"})
    assert settings == ImagingSettings(1.5, 2048, 1280, 80, 75, 6, 1_000_000)
    assert settings.encoding() == {"jpeg_quality": 80, "webp_quality": 75, "png_compression": 6}


@pytest.mark.parametrize(("key", "value"), [
    ("IMAGE_UPSCALE_FACTOR", "twice"), ("IMAGE_UPSCALE_FACTOR", 0.5), ("IMAGE_MAX_LONG_SIDE", 20000),
    ("IMAGE_JPEG_QUALITY", 0), ("IMAGE_WEBP_QUALITY", 101), ("IMAGE_PNG_COMPRESSION", 10),
    ("IMAGE_MAX_PIXELS", "1.5"), ("IMAGE_RESIZE_LONG_SIDE", 8),
])
def test_settings_refuse_bad_values(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        ImagingSettings.from_config({key: value})
