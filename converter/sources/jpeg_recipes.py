"""Opening ImageNet image files by content and the resize recipes that turn them into S×S uint8 arrays.

Each recipe reproduces a published preprocessing pixel for pixel (with the same Pillow):

- ``edm-center-crop``: EDM's ``dataset_tool.py --transform=center-crop`` (what EDM and DMD2 ImageNet-64 use).
- ``adm-center-crop``: guided-diffusion's ``center_crop_arr`` (also EDM2's ``center-crop-dhariwal``).
- ``box``: a whole-image BOX resize, as in the downsampled-ImageNet release.

Recipes take an RGB ``PIL.Image`` and return a channel-first ``(3, S, S)`` uint8 array. An image libjpeg decoded
at a reduced scale (``--fast-draft``) comes with its ``DraftScale``: the recipe then places its crop on the full
image's pixel grid, in fractional pixels of the reduced one, so only the decode is approximate, not the geometry.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from schemas.errors import ImzarrError, PathError
from schemas.suggestions import did_you_mean

DEFAULT_RECIPE = "edm-center-crop"

# fast_draft asks libjpeg for at least this many times the target size on the short side, so the exact
# recipe still does the final (anti-aliased) reduction from a moderately oversampled image.
DRAFT_OVERSAMPLE = 2
# How a reduced decode's crop is placed, recorded in a fast-draft store's settings: stores whose pixels came from
# whole-pixel crops of the reduced image (before this name) are other stores, never resumed with these.
DRAFT_GEOMETRY = "crop-on-full-image-grid"



@dataclass(frozen=True)
class DraftScale:
    """How a reduced-scale decode relates to the full image: `source_size` (width, height) at full resolution,
    decoded at 1/`scale` of each side (libjpeg rounds the reduced size up, so its last row and column may cover
    less than `scale` source pixels)."""

    source_size: tuple[int, int]
    scale: int

    def box(self, left: int, top: int, right: int, bottom: int) -> tuple[float, float, float, float]:
        """A box of full-resolution pixels in the reduced image's (fractional) pixels."""
        return (left / self.scale, top / self.scale, right / self.scale, bottom / self.scale)

    def trimmed(self, img: Image.Image) -> Image.Image:
        """The reduced image without its partial edge block: (w // scale, h // scale), the size repeated floor-halving
        reaches."""
        keep = (max(1, self.source_size[0] // self.scale), max(1, self.source_size[1] // self.scale))
        return img if keep == img.size else img.crop((0, 0) + keep)


Recipe = Callable[..., np.ndarray]  # (img, size, draft: DraftScale | None = None) -> (3, size, size) uint8

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageDecodeError(PathError):
    """An image file that cannot be opened and fully decoded."""


class RecipeError(ImzarrError):
    """A resize recipe asked for by a name that does not exist, or with an unusable size or input."""

    def __init__(self, recipe: str, reason: str) -> None:
        self.recipe = recipe
        self.reason = reason
        super().__init__(f"recipe {recipe!r}: {reason}")


def open_rgb(
    path: str | os.PathLike[str],
    *,
    fast_draft: bool = False,
    draft_size: int | None = None,
    data: bytes | None = None,
) -> Image.Image:
    """Open an image by its content, decode it completely and return it in RGB mode.

    With ``fast_draft=True`` a JPEG is decoded at a reduced DCT scale that keeps each side at least
    ``DRAFT_OVERSAMPLE * draft_size`` pixels, without its partial edge block; results then differ slightly from
    the exact recipes. ``data``: the file's bytes, already fetched (from object storage); ``path`` then only names it.
    """
    rgb, draft = open_rgb_draft(path, fast_draft=fast_draft, draft_size=draft_size, data=data)
    return rgb if draft is None else draft.trimmed(rgb)


def open_rgb_draft(
    path: str | os.PathLike[str],
    *,
    fast_draft: bool = False,
    draft_size: int | None = None,
    data: bytes | None = None,
) -> tuple[Image.Image, DraftScale | None]:
    """`open_rgb`, with a reduced-scale decode returned whole (its partial edge block kept) with its DraftScale;
    None where the image was decoded at full size."""
    if fast_draft and draft_size is None:
        raise ValueError("fast_draft=True needs draft_size (the recipe's output size)")
    if data is not None:
        if not data:
            raise ImageDecodeError(path, "empty file")
        source: Path | io.BytesIO = io.BytesIO(data)
    else:
        path = source = Path(path)
        try:
            info = path.stat()
        except OSError as exc:  # a link loop or a dangling link: this file is rejected, the run goes on
            raise ImageDecodeError(path, f"cannot read file ({exc.strerror or exc})") from None
        if stat.S_ISDIR(info.st_mode):
            raise ImageDecodeError(path, "cannot read file (is a directory)")
        if not stat.S_ISREG(info.st_mode):  # never opened: reading a FIFO would block forever
            raise ImageDecodeError(path, "cannot read file (not a regular file: a FIFO, socket or device)")
        if info.st_size == 0:
            raise ImageDecodeError(path, "empty file")
    # Only the decoding below may warn (corrupt EXIF, palette transparency, large images); those must not
    # stop a run, but warnings elsewhere in the process stay untouched.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = None
        try:
            # No `formats=` restriction: the content decides, whatever the file's extension claims.
            img = Image.open(source)
            draft = None
            if fast_draft:
                side = DRAFT_OVERSAMPLE * int(draft_size)  # type: ignore[arg-type]
                full_size = img.size
                drafted = img.draft("RGB", (side, side))  # None for formats without DCT scaling
                if drafted is not None and img.size != full_size:
                    _, (_, _, scaled_width, _) = drafted  # the full width in reduced pixels: width / scale
                    draft = DraftScale(full_size, round(full_size[0] / scaled_width))
            img.load()
            if img.mode == "RGB" and img.format == "JPEG":
                # Pillow closes a single-frame JPEG's file once loaded, so the decoded image is used as it is:
                # skipping the copy saves ~11 % of a typical photo's decode. Other formats may keep their file
                # open for more frames: they are copied or converted, then closed.
                rgb, img = img, None
            else:
                rgb = _to_rgb(img)
        except Exception as exc:  # Pillow raises a zoo of types (OSError, SyntaxError, ValueError, ...)
            raise ImageDecodeError(path, _reason(exc)) from exc
        finally:
            if img is not None:
                img.close()
    return rgb, draft


_TRUNCATION_GUARD = threading.Lock()
_truncation_users = 0
_truncation_before = False


@contextlib.contextmanager
def truncated_images_rejected() -> Iterator[None]:
    """Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` off while a conversion decodes, as it was afterwards.

    Training code often turns it on, process-wide (a script's top level, which spawned worker processes run again);
    Pillow then fills a truncated file's missing part with grey and raises nothing, and the converter would store
    that image instead of rejecting the file. Used around the whole conversion and around each part's decoding
    (in whatever process decodes it); nested and concurrent uses in one process share one switch: the first turns
    it off, the last puts back what was there. Threads of the process that decode images meanwhile see it off too."""
    global _truncation_users, _truncation_before
    with _TRUNCATION_GUARD:
        if _truncation_users == 0:
            _truncation_before = ImageFile.LOAD_TRUNCATED_IMAGES
        _truncation_users += 1
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        with _TRUNCATION_GUARD:
            _truncation_users -= 1
            if _truncation_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _truncation_before


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16→RGB conversion clips at 255, which turns most 16-bit images white;
        # keeping the high byte preserves the picture.
        eight_bit = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(eight_bit, "L").convert("RGB")
    # CMYK, L, 1, P/PA, LA, RGBA, YCbCr, I, F ...: Pillow's conversion; alpha is dropped, not composited,
    # as guided-diffusion's `convert("RGB")` does.
    return img.convert("RGB")


def _reason(exc: Exception) -> str:
    message = str(exc)
    if isinstance(exc, Image.DecompressionBombError):
        return "decompression bomb (image too large)"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    if "truncated" in message or isinstance(exc, EOFError):
        return "truncated image"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read file ({exc.strerror})"
    return f"corrupt image ({type(exc).__name__}: {message})" if message else f"corrupt image ({type(exc).__name__})"


def _check(img: Image.Image, size: int, recipe: str) -> None:
    if img.mode != "RGB":
        raise RecipeError(recipe, f"expects an RGB image, got mode {img.mode!r}")
    if size < 1:
        raise RecipeError(recipe, f"size must be a positive integer, got {size}")


def _channel_first(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def edm_center_crop(img: Image.Image, size: int, draft: DraftScale | None = None) -> np.ndarray:
    """EDM: crop the centred min(h, w) square, then LANCZOS to size×size."""
    _check(img, size, "edm-center-crop")
    width, height = img.size if draft is None else draft.source_size
    side = min(width, height)
    # EDM slices rows (h-c)//2:(h+c)//2; both bounds differ by exactly c because h-c and h+c share parity.
    top = (height - side) // 2
    left = (width - side) // 2
    if draft is not None:
        # The square of the full image, in the reduced image's fractional pixels (a whole-pixel crop there would
        # shift and shrink it by up to a reduced pixel: 4 levels mean error on 500×375, against 0.6 this way).
        return _channel_first(img.resize((size, size), Image.Resampling.LANCZOS, box=draft.box(left, top, left + side, top + side)))
    square = img.crop((left, top, left + side, top + side))
    return _channel_first(square.resize((size, size), Image.Resampling.LANCZOS))


def adm_center_crop(img: Image.Image, size: int, draft: DraftScale | None = None) -> np.ndarray:
    """guided-diffusion: halve with BOX while the short side is ≥ 2·size, BICUBIC to short side = size, crop."""
    _check(img, size, "adm-center-crop")
    if draft is not None:
        # A reduced decode without its partial edge block has the size the first halvings reach (floor each time).
        img = draft.trimmed(img)
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.Resampling.BOX)
    scale = size / min(img.size)
    # Python's round() (half to even), exactly as the reference; the short side lands on `size`.
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.BICUBIC)
    width, height = img.size
    top = (height - size) // 2
    left = (width - size) // 2
    return _channel_first(img.crop((left, top, left + size, top + size)))


def box_resize(img: Image.Image, size: int, draft: DraftScale | None = None) -> np.ndarray:
    """Downsampled-ImageNet: BOX-resize the whole image to size×size (aspect ratio not kept)."""
    _check(img, size, "box")
    box = None if draft is None else draft.box(0, 0, *draft.source_size)
    return _channel_first(img.resize((size, size), Image.Resampling.BOX, box=box))


RECIPES: dict[str, Recipe] = {
    "edm-center-crop": edm_center_crop,
    "adm-center-crop": adm_center_crop,
    "box": box_resize,
}


def get_recipe(name: str) -> Recipe:
    """The recipe registered under `name`, or a RecipeError listing the valid names."""
    try:
        return RECIPES[name]
    except KeyError:
        raise RecipeError(name, f"unknown recipe (valid recipes: {', '.join(sorted(RECIPES))}){did_you_mean(name, sorted(RECIPES))}") from None


def load_and_resize(
    path: str | os.PathLike[str], recipe: str, size: int, *, fast_draft: bool = False, data: bytes | None = None
) -> np.ndarray:
    """Open `path` (or its bytes `data`, already fetched) by content and apply `recipe`: a (3, size, size) uint8 array."""
    resize = get_recipe(recipe)
    if size < 1:
        raise RecipeError(recipe, f"size must be a positive integer, got {size}")
    img, draft = open_rgb_draft(path, fast_draft=fast_draft, draft_size=size, data=data)
    return resize(img, size, draft)
