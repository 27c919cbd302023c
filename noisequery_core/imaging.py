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

import numpy as np
from PIL import Image, ImageOps

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
