"""open_image: every pathology a real photo folder holds becomes RGB or one clear ImageError."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from coembed.data.formats import TarMember
from coembed.data.images import ImageReadError, open_image, to_rgb
from coembed.errors import ImageError


def save(im: Image.Image, path, fmt: str = "PNG", **kw) -> str:
    im.save(path, fmt, **kw)
    return str(path)


def px(im: Image.Image, xy) -> tuple:
    return im.getpixel(xy)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 20 wide x 10 high, left half red; orientation 6 means "rotate 90 degrees clockwise
    # to display", which puts the red half on top of a 10 x 20 picture.
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(Image.fromarray(a), tmp_path / "rot.jpg", "JPEG", exif=exif, quality=95)
    im = open_image(path)
    assert im.mode == "RGB" and im.size == (10, 20)
    top, bottom = np.asarray(im)[2, 5], np.asarray(im)[17, 5]
    assert top[0] > 200 and top[1] < 60 and bottom.max() < 60


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[0, 0] = (255, 0, 0, 255)  # opaque red
    a[0, 1] = (255, 0, 0, 0)  # fully transparent: white
    a[0, 2] = (0, 0, 0, 128)  # half-transparent black: mid grey
    im = open_image(save(Image.fromarray(a, "RGBA"), tmp_path / "a.png"))
    assert im.mode == "RGB"
    assert px(im, (0, 0)) == (255, 0, 0)
    assert px(im, (1, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in px(im, (2, 0)))


def test_la_composited_on_white(tmp_path):
    im = Image.new("LA", (2, 1), (0, 0))
    im.putpixel((1, 0), (0, 255))
    out = open_image(save(im, tmp_path / "la.png"))
    assert px(out, (0, 0)) == (255, 255, 255) and px(out, (1, 0)) == (0, 0, 0)


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0  # index 0 (blue) is transparent
    out = open_image(save(im, tmp_path / "p.png", transparency=0))
    assert px(out, (0, 0)) == (255, 255, 255) and px(out, (1, 0)) == (0, 255, 0)


def test_plain_palette_gif(tmp_path):
    im = Image.new("RGB", (3, 3), (200, 10, 10)).convert("P")
    out = open_image(save(im, tmp_path / "p.gif", "GIF"))
    assert out.mode == "RGB" and abs(px(out, (1, 1))[0] - 200) < 8


def test_cmyk_jpeg(tmp_path):
    im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = open_image(save(im, tmp_path / "cmyk.jpg", "JPEG", quality=100))
    r, g, b = px(out, (4, 4))
    assert out.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_16bit_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    out = open_image(save(im, tmp_path / "deep.png"))
    # A naive convert("L") would clip everything above 255 to white.
    assert [px(out, (i, 0))[0] for i in range(4)] == [0, 64, 128, 255]
    assert px(out, (2, 0)) == (128, 128, 128)


def test_32bit_integer_mode():
    im = Image.fromarray(np.array([[0, 65535, 70000]], dtype=np.int32), "I")
    assert [px(to_rgb(im), (i, 0))[0] for i in range(3)] == [0, 255, 255]


@pytest.mark.parametrize("mode", ["L", "1"])
def test_greyscale(tmp_path, mode):
    im = Image.new("L", (4, 4), 255).convert(mode)
    out = open_image(save(im, tmp_path / f"g_{mode}.png"))
    assert out.mode == "RGB" and px(out, (0, 0)) == (255, 255, 255)


def good_png_bytes() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def reason_of(source, **kw) -> str:
    with pytest.raises(ImageError) as info:
        open_image(source, **kw)
    assert isinstance(info.value, ImageReadError)
    assert "\n" not in str(info.value)
    return info.value.reason


def test_missing_file(tmp_path):
    assert reason_of(tmp_path / "nope.jpg") == "missing"


def test_zero_byte(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason_of(tmp_path / "empty.jpg") == "empty"


def test_truncated(tmp_path):
    data = good_png_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert reason_of(tmp_path / "cut.png") == "truncated"


def test_corrupt_png_data(tmp_path):
    data = bytearray(good_png_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = bytes(50)  # damage compressed pixels; the CRC no longer matches
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert reason_of(tmp_path / "bad.png") == "corrupt"


def test_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is a text file with a .jpg name\n")
    with pytest.raises(ImageError, match="not an image"):
        open_image(tmp_path / "notes.jpg")


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_bomb_refused_before_decoding():
    # A header that claims 20000 x 20000 with almost no data: decoding it would fail as
    # "truncated", so getting "too large" proves we refused from the header alone.
    bomb = png_header_only(20000, 20000)
    assert reason_of(bomb) == "too large"
    assert reason_of(png_header_only(100, 100), max_pixels=5000) == "too large"


def test_bytes_and_pil_and_tar_sources(tmp_path):
    data = good_png_bytes()
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(np.asarray(open_image(data)), ref)
    assert np.array_equal(np.asarray(open_image(Image.open(io.BytesIO(data)))), ref)
    tar_path = tmp_path / "s.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("dir/x.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert np.array_equal(np.asarray(open_image(TarMember(str(tar_path), "dir/x.png"))), ref)
    assert reason_of(TarMember(str(tar_path), "dir/y.png")) == "missing"


def test_result_is_loaded_and_detached(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(good_png_bytes())
    im = open_image(path)
    path.unlink()  # nothing may still read from the file
    assert getattr(im, "fp", None) is None
    assert np.asarray(im).shape == (32, 32, 3)
