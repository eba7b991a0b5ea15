"""Reading the clean image: paths, PIL images, arrays and tensors to a (3, H, W) uint8 RGB tensor."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .checks import first_line
from .paths import missing
from .options import DEFAULT_MAX_PIXELS

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def load_image(image: ImageLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, str]:
    """(3, H, W) uint8 RGB tensor and a name. Paths and PIL images: the EXIF orientation is applied, greyscale is
    replicated to RGB, an alpha channel is dropped, 16-bit and float images are scaled to 8 bits (16-bit: round(v
    / 257); float: values in [0, 1], x255, rounded; others are refused). Arrays: (H, W, 3) uint8, uint16 or float
    in [0, 1]; tensors: (3, H, W) uint8 or float in [0, 1]. Images above ``max_pixels`` are refused before they are
    decoded (None: no limit). The name is the file's name for a path, else what was given: ``"array"``,
    ``"tensor"``, ``"PIL image"`` (pass ``image_name=`` to the estimator for a better title)."""
    name = "PIL image" if isinstance(image, Image.Image) else "array" if isinstance(image, np.ndarray) \
        else "tensor" if isinstance(image, torch.Tensor) else "image"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        name = path.name
        reason = missing(path)  # does not exist, or a symlink loop, a broken link
        if reason:
            raise ValueError(f"image {str(path)!r} {reason}")
        if not path.is_file():  # a folder, or a pipe that would never end
            raise ValueError(f"image {str(path)!r} is not a regular file")
        bomb_limit = Image.MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit speaks instead
                Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max(max_pixels, bomb_limit or 0)
                with Image.open(path) as im:
                    _check_pixels(f"image {str(path)!r}", im.height, im.width, max_pixels)
                    image = _pil_to_rgb8(ImageOps.exif_transpose(im), str(path))
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"image {str(path)!r} cannot be read: {first_line(e)}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = bomb_limit
    if isinstance(image, Image.Image):
        image = _pil_to_rgb8(image, "image")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be (H, W, 3), got {image.shape}")
        if image.dtype == np.uint16:
            image = _u16_to_u8(image)
        # one (3, H, W) copy, which detaches the tensor from the caller's array (whatever its layout: flipped,
        # read-only, 1x1), made by numpy on one thread: torch's copy wakes its thread pool, which on a busy machine
        # waits a scheduler tick for what takes a tenth of a millisecond
        image = torch.from_numpy(image.transpose(2, 0, 1).copy())
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a path, PIL image, array or tensor, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensor must be (3, H, W), got {tuple(image.shape)}")
    _check_pixels("image", image.shape[1], image.shape[2], max_pixels)  # every input, as it is now
    if image.dtype != torch.uint8:
        x = image.detach().float().cpu()
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError(f"float image values must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        image = torch.round(x * 255).to(torch.uint8)
    return image.cpu().contiguous(), name


def _check_pixels(what: str, h: int, w: int, max_pixels: Optional[int]) -> None:
    if max_pixels is not None and h * w > max_pixels:
        raise ValueError(f"{what} is {w}x{h} = {h * w:,} pixels, above max_pixels={max_pixels:,}: raise "
                         "max_pixels to run it (memory grows with the image)")


def _u16_to_u8(a: np.ndarray) -> np.ndarray:
    return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)


def _pil_to_rgb8(im: Image.Image, what: str) -> np.ndarray:
    """(H, W, 3) uint8. PIL's convert("RGB") clips 16-bit and float pixels to 0..255 (a 16-bit grey PNG becomes
    two levels), so those modes are scaled here; 16-bit RGB files are already read as 8-bit RGB by PIL."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{what}: 32-bit integer pixels in [{a.min()}, {a.max()}], expected 0..65535 (16-bit)")
        return np.repeat(_u16_to_u8(a)[..., None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise ValueError(f"{what}: float pixels in [{np.nanmin(a):.3g}, {np.nanmax(a):.3g}], expected [0, 1]")
        return np.repeat(np.round(a * 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))
