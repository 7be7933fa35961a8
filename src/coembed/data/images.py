"""Robust image decoding: any file a user points at becomes an RGB PIL image or one clear error.

``open_image`` reads the bytes itself (so no file handle outlives the call), checks the pixel
count from the header before decoding (decompression bombs), decodes fully, applies the EXIF
orientation, and turns every mode into 8-bit RGB: alpha is composited on white, 16-bit values
are scaled by 255/65535 (not clipped), palette/CMYK/greyscale are converted.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from coembed.data.formats import TarMember
from coembed.errors import ImageError

ImageSource = str | os.PathLike | bytes | TarMember | Image.Image

# Reasons a picture is dropped; the loader counts them under these names for the run report.
REASONS = ("missing", "empty", "truncated", "corrupt", "too large")


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
        except (OSError, tarfile.TarError) as e:
            raise ImageReadError(f"{name}: cannot read the shard ({e})", "corrupt") from None
        if source.member not in index:
            raise ImageReadError(f"{name}: no such member in the shard", "missing")
        offset, size = index[source.member]
        with open(source.tar_path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) < size:
            raise ImageReadError(f"{name}: the shard is truncated", "truncated")
    else:
        path = Path(source)
        try:
            data = path.read_bytes()
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
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes); re-export or remove it", "empty")
    return data


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
    empty, truncated, corrupt, non-image and too-large inputs.
    """
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source) or source)
    name = describe(source)
    data = read_source_bytes(source)
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; PIL's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        width, height = im.size
        if width * height > max_pixels:
            raise ImageReadError(
                f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of "
                f"{max_pixels:,}; shrink the image or raise max_pixels",
                "too large",
            )
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
