"""Decode a user's image file as it is seen: upright (EXIF orientation) and 8-bit sRGB by its real value range.

Every place that opens a user image (library import, ``--like-image``, NoiseCLR training folders) goes through
``load_image``, so one photo gives the same features wherever it enters. Pillow's own ``convert("RGB")`` clips
16-bit and 32-bit values to 0..255 (a mid-grey 16-bit PNG becomes white, a float TIFF of 0.5 black) and ignores
the EXIF orientation a viewer applies.

How each kind of image becomes 8-bit RGB (the choices are deliberate):
    * 16-bit grey (Pillow modes I;16, I;16B, I;16L, I;16N) and 32-bit integer grey (mode I, which is how Pillow
      reads 16-bit PNGs and TIFFs): value / 257, so 0..65535 maps onto 0..255 exactly; values beyond 65535
      are clipped.
    * 32-bit float grey (mode F, float TIFFs): 0..1 is the displayed range (as in ComfyUI's IMAGE tensors),
      value * 255, clipped to 0..1; an image with NaN or infinite pixels is refused.
    * palette, grey, grey+alpha, RGBA, CMYK, YCbCr, LAB, HSV, 1-bit: Pillow's conversion. Alpha is dropped and
      the stored colours kept, as ComfyUI's LoadImage does for its IMAGE output.
    * 16-bit-per-channel RGB(A) PNGs are reduced to 8 bits by Pillow's decoder itself (it keeps the high byte).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from .errors import NoiseQueryError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageDecodeError(NoiseQueryError):
    """An image file that cannot be turned into the 8-bit RGB picture it shows."""


def to_rgb8(image: Image.Image, where: str = "image") -> Image.Image:
    """``image`` as 8-bit RGB by its real value range (see the module docstring); ``where`` names it in errors.

    Raises:
        ImageDecodeError: float pixels that are NaN/infinite, or a mode Pillow cannot convert.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(image).astype(np.float64)
        grey = np.rint(np.clip(arr, 0.0, 65535.0) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageDecodeError(f"{where}: a 32-bit float image with NaN or infinite pixels; save it again with "
                                   "finite values (0..1 is black..white).")
        grey = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"{where}: cannot convert a {mode!r} image to RGB ({exc}); save it as an 8-bit or "
                               "16-bit PNG or a JPEG.") from exc


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file as the upright 8-bit RGB picture a viewer shows (first frame of a multi-frame file).

    Raises:
        OSError / PIL.UnidentifiedImageError: the file cannot be read or is not an image (as Image.open);
        PIL.Image.DecompressionBombError: too many pixels;
        ImageDecodeError: pixel values that have no picture (see to_rgb8).
    """
    with Image.open(path) as im:
        im.load()
        # EXIF orientation first: phones store the sensor's layout and a tag saying how to turn it.
        upright = ImageOps.exif_transpose(im)
        return to_rgb8(upright, where=str(path))


def loss_curve_picture(losses: Sequence[float], note: str = "", width: int = 512, height: int = 256) -> np.ndarray:
    """A training loss per iteration (blue) and its running mean (orange) as a uint8 [height, width, 3] picture;
    the title gives first -> last, min and max, then ``note``. Shared by the pack's training nodes."""
    im = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(im)
    if len(losses) >= 2:
        arr = np.asarray(losses, dtype=np.float64)
        w = max(1, len(arr) // 20)
        smooth = np.convolve(arr, np.ones(w) / w, mode="valid")
        lo, hi = float(arr.min()), float(arr.max())
        span = hi - lo or 1.0
        n = len(arr) - 1

        def pts(values: np.ndarray, offset: int) -> list[tuple[float, float]]:
            return [(8 + (i + offset) / n * (width - 16), height - 20 - (v - lo) / span * (height - 40))
                    for i, v in enumerate(values)]

        draw.line(pts(arr, 0), fill=(90, 110, 160), width=1)
        if len(smooth) >= 2:
            draw.line(pts(smooth, w - 1), fill=(250, 190, 60), width=2)
        title = f"loss {arr[0]:.3f} -> {arr[-1]:.3f} (min {lo:.3f}, max {hi:.3f})"
    else:
        title = "fewer than 2 iterations"
    draw.text((8, 4), f"{title}{note}", fill=(230, 230, 230))
    return np.asarray(im, dtype=np.uint8)
