"""Reading pictures: one decoder for the whole project, every pixel format to the RGB picture it holds.

Training, the mean/std estimate, `eval`, `predict` and `features` all read pixels with `open_image`,
so a photo is the same tensor wherever it is used. Hostile files (decompression bombs, broken
headers, formats that would run external programs) are refused by name as UserError.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError

__all__ = ["ALPHA_BACKGROUND", "IMAGE_EXTENSIONS", "IMAGE_FORMATS", "MAX_PIXELS", "image_size_of", "open_image",
           "opened_image", "refusal"]

# The picture files vggnet reads, by extension and by PIL format. Only these raster formats are
# parsed: PIL's other plugins include PostScript/PDF (which run Ghostscript) and rarely used
# parsers that are no part of a photo collection.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")   # JPEG includes multi-picture MPO
# Decompression bombs: a header may claim any size, and decoding it allocates width x height x 3
# bytes. 64 megapixels (8192 x 8192, 192 MiB as RGB) is above every camera photo and ImageNet
# image and below PIL's own warning (89 Mpx); larger files are refused by name before decoding.
MAX_PIXELS = 8192 * 8192
# Transparent pixels are composited over white: the page colour that images with alpha (logos,
# scans, screenshots) are made to be seen on, and what browsers and viewers show.
ALPHA_BACKGROUND = (255, 255, 255)
_OPEN_LOCK = threading.Lock()               # guards the warnings filter while PIL parses a header


@contextmanager
def opened_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """PIL's lazy open (header only) of one of IMAGE_FORMATS, with decompression bombs refused.

    PIL warns (DecompressionBombWarning) above its own limit and raises at twice that; the warning
    is made an error for this call only (under a lock: the warnings filter is process-wide, and
    datasets decode from threads), then MAX_PIXELS, lower than PIL's, is applied to the header size.
    """
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(path, formats=IMAGE_FORMATS)
    try:
        w, h = im.size
        if w < 1 or h < 1:
            raise ValueError(f"its header gives an empty {w} x {h} picture")
        if w * h > MAX_PIXELS:
            raise Image.DecompressionBombError(f"its header claims {w} x {h} = {w * h / 1e6:.0f} megapixels")
        yield im
    finally:
        im.close()


def refusal(path: str | os.PathLike, e: BaseException) -> UserError:
    """One line naming the file and what was wrong with it, for any failure while decoding."""
    if isinstance(e, UserError):
        return e
    if isinstance(e, FileNotFoundError):
        return UserError(f"image not found: {path}")
    if isinstance(e, IsADirectoryError):
        return UserError(f"expected an image file, got the directory {path}")
    if isinstance(e, PermissionError):
        return UserError(f"cannot read image {path}: permission denied")
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return UserError(f"refusing image {path}: a decompression bomb ({_first_line(e)}); vggnet decodes "
                         f"at most {MAX_PIXELS / 2**20:.0f} Mi pixels ({int(MAX_PIXELS ** 0.5)} x {int(MAX_PIXELS ** 0.5)})")
    kind = _sniff(path)
    if isinstance(e, UnidentifiedImageError) and kind is None:
        return UserError(f"cannot read image {path}: not a picture vggnet reads "
                         f"(expected {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]})")
    return UserError(f"cannot decode image {path}: a corrupt or truncated {kind or 'image'} file "
                     f"({type(e).__name__}: {_first_line(e)})")


# The first bytes of each format vggnet reads, to name the format of a file PIL could not parse.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "WEBP"), (b"P1", "PPM"), (b"P2", "PPM"),
          (b"P3", "PPM"), (b"P4", "PPM"), (b"P5", "PPM"), (b"P6", "PPM"))


def _sniff(path: str | os.PathLike) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if head.startswith(b"RIFF") and head[8:12] != b"WEBP":
        return None
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no detail"


def open_image(path: str | os.PathLike, *, draft: int | None = None) -> Image.Image:
    """Decode an image file to the RGB picture it holds (8 bits per channel, EXIF orientation applied).

    The one decoder of the project: training, the mean/std estimate, `eval`, `predict` and
    `features` all read pixels here. Pixel formats: 1-bit, grey, palette, CMYK and YCbCr become RGB;
    transparency (alpha, palette or colour-key) is composited over ALPHA_BACKGROUND (white); 16-bit
    grey is scaled by its full range (65535 -> 255, not clipped); 32-bit integer grey the same when
    its values fit 16 bits, else its actual [min, max] is stretched to [0, 255]; float grey in
    [0, 1] is taken as intensities, other finite ranges are stretched, NaN/inf are refused. Animated
    GIF/PNG and multi-page TIFF give their first frame. `draft`: the smallest side the caller needs;
    a JPEG is then decoded at 1/2, 1/4 or 1/8 scale when both sides stay >= draft (much faster on
    large photos). Any failure (missing, not a picture, truncated, hostile header, more than
    MAX_PIXELS) raises UserError naming the file.
    """
    try:
        with opened_image(path) as im:
            if draft and im.format in ("JPEG", "MPO"):
                im.draft(im.mode, (draft, draft))       # DCT-domain downscale; both sides stay >= draft
            orientation = _orientation(im)
            rgb = _to_rgb(im)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
        raise refusal(path, e) from None
    return rgb.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else rgb


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file's header alone (no decoding); UserError naming a bad file."""
    try:
        with opened_image(path) as im:
            return im.size
    except Exception as e:
        raise refusal(path, e) from None


# EXIF orientation (tag 0x0112) -> the transpose that shows the picture upright (as ImageOps.exif_transpose).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation, 1 (as stored) when there is none or the EXIF block is unreadable:
    a damaged EXIF block leaves the pixels themselves intact, so it is not a reason to refuse them."""
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """The picture an opened image holds, as 8-bit RGB (first frame); ValueError for other modes."""
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    mode = im.mode
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or ("transparency" in im.info and mode in ("1", "L", "P", "RGB")):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode in ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    if mode == "I" or mode.startswith("I;16"):
        return Image.fromarray(_int_to_uint8(np.asarray(im)), mode="L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(im, dtype=np.float64)), mode="L").convert("RGB")
    raise ValueError(f"pixel mode {mode} is not supported (expected 1-bit, grey, palette, RGB, CMYK, YCbCr, LAB, "
                     f"16/32-bit grey or float grey, with or without alpha)")


def _int_to_uint8(x: np.ndarray) -> np.ndarray:
    """16-bit grey -> 8 bits over the format's full range (x / 257: 0 -> 0, 65535 -> 255); 32-bit
    grey the same when it fits 16 bits (PIL reads 16-bit PNGs as 32-bit), else its [min, max]."""
    x = x.astype(np.float64)
    if x.size and (x.min() < 0 or x.max() > 65535):
        return _stretch(x)
    return np.round(x / 257).astype(np.uint8)


def _float_to_uint8(x: np.ndarray) -> np.ndarray:
    if not np.isfinite(x).all():
        raise ValueError("float pixels include NaN or infinity")
    if x.size and x.min() >= 0 and x.max() <= 1:
        return np.round(x * 255).astype(np.uint8)       # intensities in [0, 1], kept as they are
    return _stretch(x)


def _stretch(x: np.ndarray) -> np.ndarray:
    """Map the image's actual [min, max] linearly onto [0, 255] (a constant image becomes black)."""
    lo, hi = float(x.min()), float(x.max())
    return np.round((x - lo) * (255 / (hi - lo) if hi > lo else 0.0)).astype(np.uint8)
