"""Robust image decoding: any file a user points at becomes an RGB PIL image or one clear error.

``open_image`` reads the bytes itself (so no file handle outlives the call), reading only regular
files of at most ``MAX_IMAGE_BYTES``, checks the pixel count and the aspect ratio from the header
before decoding (decompression bombs, and strips that resizing would blow up), decodes fully,
applies the EXIF orientation, and turns every mode into 8-bit RGB: alpha is composited on white,
16-bit values are scaled by 255/65535 (not clipped), palette/CMYK/greyscale are converted.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from coembed.data.formats import TarMember
from coembed.errors import ImageError
from coembed.files import FileTooLarge, NotRegularFile, read_regular_file

ImageSource = str | os.PathLike | bytes | TarMember | Image.Image

# Reasons a picture is dropped; the loader counts them under these names for the run report.
REASONS = ("missing", "empty", "truncated", "corrupt", "too large", "not a file")

# An uncompressed 8-bit RGBA image at the default 64 MP pixel limit is 256 MiB: no 8-bit image
# the pixel limit lets through is refused for its bytes, and a multi-GB file named by mistake is
# refused from its size, before anything is read.
MAX_IMAGE_BYTES = 256 * 1024 * 1024
# Panoramas (~12:1), web banners (970x90, ~11:1) and long scrolled screenshots (~20:1) pass. At
# 50:1 the square center crop the model sees is 2% of the picture, and resizing the short side
# to S makes at most 50 S^2 pixels (2.5 MP at S = 224); a 1 x 1,000,000 strip would make 64 G.
MAX_ASPECT_RATIO = 50


class ImageReadError(ImageError):
    """An ``ImageError`` that also says why, as one of ``REASONS``, for the skip counts."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def describe(source: ImageSource) -> str:
    """A short human name for an image source, for error messages."""
    if isinstance(source, TarMember):
        return f"{source.tar_path}:{source.member}"
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size}>"
    return os.fspath(source)


# tar path -> (mtime_ns, size, {member name: (data offset, size)}). Looking a member up with
# tarfile scans the whole archive; one index per shard makes random access O(1).
_TAR_INDEX: dict[str, tuple[int, int, dict[str, tuple[int, int]]]] = {}
_TAR_LOCK = threading.Lock()


def _tar_index(tar_path: str) -> dict[str, tuple[int, int]]:
    st = os.stat(tar_path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile("the shard is not a regular file")
    with _TAR_LOCK:
        cached = _TAR_INDEX.get(tar_path)
        if cached and cached[0] == st.st_mtime_ns and cached[1] == st.st_size:
            return cached[2]
    with tarfile.open(tar_path, "r:") as tar:
        index = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
    with _TAR_LOCK:
        _TAR_INDEX[tar_path] = (st.st_mtime_ns, st.st_size, index)
    return index


def read_source_bytes(source: str | os.PathLike | bytes | TarMember) -> bytes:
    """The encoded bytes of an image source; ``ImageReadError`` if it is missing or empty."""
    name = describe(source)
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, TarMember):
        try:
            index = _tar_index(source.tar_path)
        except FileNotFoundError:
            raise ImageReadError(f"{name}: shard not found; check the path", "missing") from None
        except NotRegularFile as e:
            raise ImageReadError(f"{name}: {e}", "not a file") from None
        except (OSError, tarfile.TarError) as e:
            raise ImageReadError(f"{name}: cannot read the shard ({e})", "corrupt") from None
        if source.member not in index:
            raise ImageReadError(f"{name}: no such member in the shard", "missing")
        offset, size = index[source.member]
        if size > MAX_IMAGE_BYTES:
            raise ImageReadError(
                f"{name}: {size:,} bytes is over the limit of {MAX_IMAGE_BYTES:,}", "too large"
            )
        with open(source.tar_path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) < size:
            raise ImageReadError(f"{name}: the shard is truncated", "truncated")
    else:
        try:
            data = read_regular_file(source, MAX_IMAGE_BYTES)
        except FileNotFoundError:
            raise ImageReadError(
                f"{name}: image not found; check the path (relative paths resolve against the "
                "dataset file's folder)",
                "missing",
            ) from None
        except IsADirectoryError:
            raise ImageReadError(f"{name}: is a folder, not an image file", "corrupt") from None
        except PermissionError:
            raise ImageReadError(
                f"{name}: permission denied; make it readable", "missing"
            ) from None
        except NotRegularFile as e:
            raise ImageReadError(f"{name}: {e}; name an image file", "not a file") from None
        except FileTooLarge as e:
            raise ImageReadError(f"{name}: {e} for an image file", "too large") from None
        except OSError as e:
            raise ImageReadError(f"{name}: cannot read it ({e.strerror or e})", "missing") from None
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes); re-export or remove it", "empty")
    return data


def check_shape(name: str, width: int, height: int, max_pixels: int | None = None) -> None:
    """ImageReadError ("too large") for an image over ``max_pixels`` or ``MAX_ASPECT_RATIO``."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageReadError(
            f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of "
            f"{max_pixels:,}; shrink the image or raise max_pixels",
            "too large",
        )
    short, long = sorted((width, height))
    if long > MAX_ASPECT_RATIO * short:
        shown = f"{long / short:,.0f}:1" if short else "infinite"
        raise ImageReadError(
            f"{name}: {width}x{height} has an aspect ratio of {shown}, over the limit of "
            f"{MAX_ASPECT_RATIO}:1; crop it into pieces",
            "too large",
        )


def _scale_16bit(im: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer greyscale image onto 0..255 by value * 255 / 65535."""
    a = np.asarray(im, dtype=np.float64)
    a = np.clip(a, 0, 65535) * (255.0 / 65535.0)
    return Image.fromarray(np.round(a).astype(np.uint8), "L")


def _scale_float(im: Image.Image) -> Image.Image:
    """Mode 'F' (float TIFF): values in [0, 1] are scaled to 0..255, larger ones are 0..255."""
    a = np.asarray(im, dtype=np.float64)
    if np.nanmax(a) <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.round(np.clip(np.nan_to_num(a), 0, 255)).astype(np.uint8), "L")


def _on_white(im: Image.Image) -> Image.Image:
    """Composite an image with alpha onto a white background; returns RGB."""
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any loaded PIL image as a new 8-bit RGB image (alpha on white, 16-bit scaled)."""
    mode = im.mode
    if mode in ("RGBA", "LA", "RGBa", "La", "PA") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    ):
        return _on_white(im)
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I;16") or mode == "I":
        return _scale_16bit(im).convert("RGB")
    if mode == "F":
        return _scale_float(im).convert("RGB")
    # 1, L, P, CMYK, YCbCr, HSV: PIL's own conversions are right for these.
    return im.convert("RGB")


def open_image(
    source: ImageSource, max_pixels: int = 64_000_000, min_size: int | None = None
) -> Image.Image:
    """Decode ``source`` (a path, raw bytes, a ``TarMember`` or a PIL image) into RGB.

    ``min_size``, if given, lets JPEGs decode at a reduced scale (DCT scaling) as long as both
    sides stay at least ``min_size`` pixels: much faster for big photos that will be shrunk
    anyway. Leave it None when exact parity with a full decode matters (evaluation).

    Raises ``ImageReadError`` (an ``ImageError``, with a ``reason`` from ``REASONS``) for missing,
    empty, truncated, corrupt, non-image and too-large inputs (over ``max_pixels``,
    ``MAX_IMAGE_BYTES`` or ``MAX_ASPECT_RATIO``), and for paths naming no regular file.
    """
    if isinstance(source, Image.Image):
        check_shape(describe(source), *source.size)
        return to_rgb(ImageOps.exif_transpose(source) or source)
    name = describe(source)
    data = read_source_bytes(source)
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; PIL's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        check_shape(name, *im.size, max_pixels=max_pixels)
        if min_size is not None and im.format == "JPEG":
            im.draft("RGB", (min_size, min_size))
        im.load()
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            f"{name}: refused as a decompression bomb ({e})", "too large"
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{name}: not an image file PIL can read; remove it or convert it to JPEG/PNG",
            "corrupt",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports damaged data with any of these; "truncated" is in the message for cut-off
        # files, which is worth telling apart (usually an interrupted download).
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ImageReadError(
            f"{name}: {reason} image data ({e}); re-download or remove it", reason
        ) from None
    try:
        oriented = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - broken EXIF must not lose good pixels; keep the raw ones
        oriented = im
    return to_rgb(oriented)
