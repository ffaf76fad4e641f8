"""Reading image files and bringing them to a model's square input size.

One loader for every place that reads single image files outside a torchvision pipeline:
``robustify.py`` (the images to robustify) and the ``folder`` outlier sources
(:mod:`safespot.data.outliers`); ``npy`` outliers use the same resize.

- :func:`decode_image`: a file (path or bytes) as an 8-bit ``(C, H, W)`` tensor, decoded by
  PIL (every format PIL reads), turned upright by its EXIF orientation tag (as a viewer shows
  it) and converted to RGB (``channels=3``) or greyscale (``channels=1``).
- :func:`to_8bit`: 16-bit greyscale images (PIL modes ``I;16*``, and ``I`` from a PNG) scaled
  to 8 bits, ``round(v * 255 / 65535)``: PIL's own ``convert`` clips them at 255, i.e. turns
  nearly every pixel white. (16-bit RGB and RGBA PNGs PIL already opens as 8-bit, keeping the
  high byte.) 32-bit integer and floating-point images, whose white level is unknown, are
  refused (:class:`UnsupportedImageError`). :func:`pil_loader` is the loader of the ImageFolder
  datamodules, so that their images are read with the same scaling.
- :func:`resize_and_crop`: the shorter side resized to ``size`` (the longer side scaled alike,
  rounded), then the centre ``size x size`` crop; images already ``size x size`` are returned
  unchanged.

The interpolation is **bilinear with antialiasing** (``torchvision.transforms.v2.functional.
resize(..., antialias=True)``): within 1/255 of PIL's bilinear resize, i.e. of
``torchvision.transforms.Resize`` in the datamodules' ImageNet pipeline. Antialiasing matters
when shrinking, the usual case (a photo brought to 32 x 32): without it bilinear reads only
2 x 2 pixels per output pixel and aliases. (Before, ``robustify.py`` used PIL's bicubic and the
outlier folders PIL's bilinear.) On 8-bit images the result is rounded to 8 bits, which
robustification needs (its output is an 8-bit PNG compared with this input).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

#: file extensions the outlier folders read (PIL decodes all of them)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
#: the one interpolation of :func:`resize_and_crop`
INTERPOLATION = InterpolationMode.BILINEAR


class UnsupportedImageError(ValueError):
    """An image PIL reads but whose pixel values have no fixed range to scale to 8 bits."""


#: PIL modes of 16-bit greyscale images (unsigned, little-, big- or native-endian)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8bit(img: Image.Image, file_format: str | None = None) -> Image.Image:
    """``img`` with 8 bits per channel: a 16-bit greyscale image (:data:`SIXTEEN_BIT_MODES`, or
    mode ``I`` from a PNG, whose samples have at most 16 bits) scaled by 255/65535 and rounded
    (mode ``L``); an image of another integer or a floating-point mode is refused
    (:class:`UnsupportedImageError`); every other mode is returned as it is (PIL converts those
    exactly). ``file_format``: the format the image was read from (default ``img.format``,
    which a transposed copy no longer has)."""
    file_format = file_format or img.format
    sixteen = img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and file_format == "PNG")
    if sixteen:
        values = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.rint(values * (255 / 65535)).clip(0, 255).astype(np.uint8), mode="L")
    if img.mode in ("I", "F") or img.mode.startswith(("I;", "F;")):
        kind = "floating-point" if img.mode.startswith("F") else "signed or 32-bit integer"
        raise UnsupportedImageError(
            f"{kind} images (PIL mode {img.mode}) are not supported: their white level is unknown; "
            "save the image with 8 or 16 bits per channel"
        )
    return img


def pil_loader(path: str | Path) -> Image.Image:
    """An RGB PIL image of the file at ``path``: torchvision's ``ImageFolder`` loader
    (``convert("RGB")``, no EXIF rotation) with 16-bit images scaled by :func:`to_8bit`."""
    with open(path, "rb") as f, Image.open(f) as img:
        img.load()
        return to_8bit(img).convert("RGB")


def decode_image(source: str | Path | bytes, channels: int = 3) -> torch.Tensor:
    """The image in ``source`` (a path or the file's bytes) as a uint8 tensor ``(channels, H, W)``,
    upright by its EXIF orientation, 16-bit images scaled to 8 bits (:func:`to_8bit`). Raises
    PIL's errors for unreadable files (``PIL.UnidentifiedImageError`` for an unknown format,
    ``OSError`` for a damaged one) and :class:`UnsupportedImageError`."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        img.load()
        upright = to_8bit(ImageOps.exif_transpose(img), img.format)
        array = np.asarray(upright.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``(height, width)`` after scaling the shorter side to ``size`` (each side rounded, and
    at least ``size``)."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def resize_and_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """``image`` (``(C, H, W)``, uint8 or float) with its shorter side resized to ``size``
    (bilinear, antialiased) and centre-cropped to ``(C, size, size)``; the input itself when it
    already has that size. Of an odd excess the extra row/column is cut at the bottom/right."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    height, width = image.shape[-2:]
    if (height, width) == (size, size):
        return image
    h, w = resized_shape(height, width, size)
    resized = TF.resize(image, [h, w], interpolation=INTERPOLATION, antialias=True)
    top, left = (h - size) // 2, (w - size) // 2
    return resized[..., top : top + size, left : left + size].contiguous()


def read_image(source: str | Path | bytes, size: int | None = None, channels: int = 3) -> torch.Tensor:
    """:func:`decode_image`, then :func:`resize_and_crop` to ``size`` (when given): a uint8
    tensor ``(channels, size, size)``."""
    image = decode_image(source, channels)
    return image if size is None else resize_and_crop(image, size)
