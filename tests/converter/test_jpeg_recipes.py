"""Recipes match straightforward PIL references pixel for pixel; opening is by content; failures are clear."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from converter.sources.jpeg_recipes import (
    DEFAULT_RECIPE,
    RECIPES,
    ImageDecodeError,
    RecipeError,
    load_and_resize,
    open_rgb,
)
from schemas.errors import ImzarrError

S = 64


# --- references, written from the published steps, independent of the module under test ---------------


def ref_edm(img: Image.Image, size: int) -> np.ndarray:
    arr = np.array(img)
    h, w = arr.shape[:2]
    c = min(h, w)
    arr = arr[(h - c) // 2 : (h + c) // 2, (w - c) // 2 : (w + c) // 2]
    out = Image.fromarray(arr, "RGB").resize((size, size), Image.LANCZOS)
    return np.array(out).transpose(2, 0, 1)


def ref_adm(img: Image.Image, size: int) -> np.ndarray:
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    y = (arr.shape[0] - size) // 2
    x = (arr.shape[1] - size) // 2
    return arr[y : y + size, x : x + size].transpose(2, 0, 1)


def ref_box(img: Image.Image, size: int) -> np.ndarray:
    return np.array(img.resize((size, size), Image.BOX)).transpose(2, 0, 1)


REFERENCES = {"edm-center-crop": ref_edm, "adm-center-crop": ref_adm, "box": ref_box}


# --- generated images ------------------------------------------------------------------------------------


def photo_like(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth shading, hard-edged discs and sensor-like noise: an HxWx3 uint8 stand-in for a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = 128 + 60 * np.sin(x / (37 + 11 * c) + c) * np.cos(y / (53 - 7 * c)) + 40 * np.sin(
            (x + y) / (90 + 13 * c)
        )
    for _ in range(25):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, max(4, min(w, h) / 4))
        disc = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[disc] = img[disc] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def save(path: Path, img: Image.Image, fmt: str, **kw) -> Path:
    img.save(path, format=fmt, **kw)
    return path


def make_case(tmp_path: Path, case: str) -> Path:
    if case == "rgb-500x375":
        return save(tmp_path / "a.JPEG", Image.fromarray(photo_like(500, 375)), "JPEG", quality=90)
    if case == "rgb-375x500-odd":
        return save(tmp_path / "b.JPEG", Image.fromarray(photo_like(375, 501, 1)), "JPEG", quality=90)
    if case == "cmyk-jpeg":
        return save(tmp_path / "c.JPEG", Image.fromarray(photo_like(300, 200, 2)).convert("CMYK"), "JPEG")
    if case == "gray-jpeg":
        return save(tmp_path / "g.JPEG", Image.fromarray(photo_like(333, 500, 3)).convert("L"), "JPEG")
    if case == "png-named-jpeg":
        return save(tmp_path / "n02105855_2933.JPEG", Image.fromarray(photo_like(257, 190, 4)), "PNG")
    if case == "rgba-png":
        rgba = np.dstack([photo_like(160, 120, 5), np.linspace(0, 255, 160 * 120).reshape(120, 160)])
        return save(tmp_path / "d.png", Image.fromarray(rgba.astype(np.uint8), "RGBA"), "PNG")
    if case == "palette-png":
        return save(tmp_path / "p.png", Image.fromarray(photo_like(150, 140, 6)).convert("P"), "PNG")
    if case == "small-20x30":
        return save(tmp_path / "s.JPEG", Image.fromarray(photo_like(20, 30, 7)), "JPEG")
    if case == "wide-1000x40":
        return save(tmp_path / "w.JPEG", Image.fromarray(photo_like(1000, 40, 8)), "JPEG")
    if case == "tall-40x1000":
        return save(tmp_path / "t.JPEG", Image.fromarray(photo_like(40, 1000, 9)), "JPEG")
    if case == "big-1030x777":
        return save(tmp_path / "big.jpg", Image.fromarray(photo_like(1030, 777, 10)), "JPEG")
    raise AssertionError(case)


CASES = [
    "rgb-500x375",
    "rgb-375x500-odd",
    "cmyk-jpeg",
    "gray-jpeg",
    "png-named-jpeg",
    "rgba-png",
    "palette-png",
    "small-20x30",
    "wide-1000x40",
    "tall-40x1000",
    "big-1030x777",
]


# --- recipes ---------------------------------------------------------------------------------------------


def test_registry_and_default():
    assert set(RECIPES) == {"edm-center-crop", "adm-center-crop", "box"}
    assert DEFAULT_RECIPE == "edm-center-crop"


@pytest.mark.parametrize("recipe", sorted(REFERENCES))
@pytest.mark.parametrize("case", CASES)
def test_recipe_matches_reference_pixel_for_pixel(tmp_path, case, recipe):
    path = make_case(tmp_path, case)
    expected = REFERENCES[recipe](Image.open(path).convert("RGB"), S)
    got = load_and_resize(path, recipe, S)
    assert got.dtype == np.uint8
    assert got.shape == (3, S, S)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
    # The recipe function alone, on an already-opened image, agrees too.
    np.testing.assert_array_equal(RECIPES[recipe](open_rgb(path), S), expected)


@pytest.mark.parametrize("size", [1, 7, 32, 256])
def test_recipes_other_sizes(tmp_path, size):
    path = make_case(tmp_path, "rgb-500x375")
    img = Image.open(path).convert("RGB")
    for name, ref in REFERENCES.items():
        np.testing.assert_array_equal(load_and_resize(path, name, size), ref(img, size))


def test_adm_uses_half_to_even_rounding():
    # 6×4 at S=3: scale 0.75 makes the width exactly 4.5; Python's round() gives 4 (floor(x+0.5) would give
    # 5 and shift the crop by one column).
    img = Image.fromarray(photo_like(6, 4, 11))
    got = RECIPES["adm-center-crop"](img, 3)
    expected = np.array(img.resize((4, 3), Image.BICUBIC))[:, 0:3].transpose(2, 0, 1)
    np.testing.assert_array_equal(got, expected)
    shifted = np.array(img.resize((5, 3), Image.BICUBIC))[:, 1:4].transpose(2, 0, 1)
    assert not np.array_equal(got, shifted)


def test_edm_crop_is_centered_with_floor_offsets():
    # 6 wide, 3 high: columns (6-3)//2 = 1 up to (6+3)//2 = 4 are kept; LANCZOS to the same size is a copy.
    arr = np.zeros((3, 6, 3), np.uint8)
    arr[:, :, 0] = np.arange(6) * 40
    got = RECIPES["edm-center-crop"](Image.fromarray(arr), 3)
    np.testing.assert_array_equal(got[0], [[40, 80, 120]] * 3)


def test_recipe_rejects_non_rgb_and_bad_size(tmp_path):
    with pytest.raises(RecipeError, match="RGB"):
        RECIPES["box"](Image.new("L", (10, 10)), 4)
    with pytest.raises(RecipeError, match="positive"):
        load_and_resize(make_case(tmp_path, "small-20x30"), "box", 0)


def test_unknown_recipe_lists_valid_names(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_and_resize(tmp_path / "never-opened.JPEG", "lanczos-please", S)
    assert isinstance(info.value, ImzarrError)
    assert "adm-center-crop, box, edm-center-crop" in str(info.value)
    assert info.value.recipe == "lanczos-please"


# --- opening ---------------------------------------------------------------------------------------------


def test_open_by_content_not_extension(tmp_path):
    path = make_case(tmp_path, "png-named-jpeg")
    img = open_rgb(path)
    assert img.mode == "RGB"
    assert img.size == (257, 190)
    np.testing.assert_array_equal(np.array(img), photo_like(257, 190, 4))


def open_file_paths() -> set[str]:
    """Paths this process holds open (Linux /proc); skips the calling test where that is missing."""
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to see open files")
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used
            pass
    return paths


@pytest.mark.parametrize("fast_draft", [False, True])
@pytest.mark.parametrize("case", ["rgb-500x375", "cmyk-jpeg", "png-named-jpeg", "palette-png", "mpo"])
def test_opened_images_hold_no_file_open(tmp_path, case, fast_draft):
    """An RGB JPEG is returned as decoded (no copy); every image is usable once its file is closed."""
    if case == "mpo":  # two frames: Pillow keeps the file open after load(), so it must be copied and closed
        frames = [Image.fromarray(photo_like(120, 90, s)) for s in (11, 12)]
        path = tmp_path / "two-frames.JPEG"
        frames[0].save(path, "MPO", save_all=True, append_images=frames[1:])
    else:
        path = make_case(tmp_path, case)
    with Image.open(path) as raw:
        assert case != "mpo" or raw.format == "MPO"
        expected = np.array(raw.convert("RGB"))
    img = open_rgb(path, fast_draft=fast_draft, draft_size=S)
    assert str(path) not in open_file_paths()
    if not fast_draft or case in ("png-named-jpeg", "palette-png"):  # a draft decode differs from the full one
        np.testing.assert_array_equal(np.array(img), expected)
    else:
        assert img.mode == "RGB" and min(img.size) >= S


def test_truncated_jpeg_leaves_no_file_open(tmp_path):
    whole = make_case(tmp_path, "rgb-500x375").read_bytes()
    path = tmp_path / "cut.JPEG"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageDecodeError):
        open_rgb(path)
    assert str(path) not in open_file_paths()


@pytest.mark.parametrize(
    "case, pil_mode",
    [("cmyk-jpeg", "CMYK"), ("gray-jpeg", "L"), ("rgba-png", "RGBA"), ("palette-png", "P")],
)
def test_modes_become_rgb_as_pillow_converts_them(tmp_path, case, pil_mode):
    path = make_case(tmp_path, case)
    with Image.open(path) as raw:
        assert raw.mode == pil_mode
        expected = np.array(raw.convert("RGB"))
    got = open_rgb(path)
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.array(got), expected)


def test_la_and_one_bit_images(tmp_path):
    la = Image.fromarray(np.dstack([photo_like(30, 20)[..., 0], np.full((20, 30), 9, np.uint8)]), "LA")
    la.save(tmp_path / "la.png")
    np.testing.assert_array_equal(np.array(open_rgb(tmp_path / "la.png")), np.array(la.convert("RGB")))
    bw = Image.fromarray(photo_like(30, 20)[..., 0] > 128)
    bw.save(tmp_path / "bw.bmp")
    np.testing.assert_array_equal(np.array(open_rgb(tmp_path / "bw.bmp")), np.array(bw.convert("RGB")))


def test_sixteen_bit_grayscale_keeps_high_byte(tmp_path):
    values = np.array([[0, 255, 256, 300], [4095, 32768, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")
    got = np.array(open_rgb(tmp_path / "deep.png"))
    expected = (values >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], expected)


def test_decode_warnings_are_silenced_locally(tmp_path):
    # A palette PNG with byte transparency makes Pillow warn during convert("RGB"), as corrupt EXIF does.
    path = tmp_path / "t.png"
    Image.fromarray(photo_like(40, 30)).convert("P").save(path, transparency=bytes([0] * 256))
    with pytest.warns(UserWarning, match="Transparency"):
        Image.open(path).convert("RGB")
    before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_rgb(path).mode == "RGB"
        with pytest.raises(UserWarning):
            warnings.warn("still an error outside open_rgb", UserWarning)
    assert warnings.filters == before


def _jpeg_bytes(tmp_path: Path) -> bytes:
    return make_case(tmp_path, "rgb-500x375").read_bytes()


@pytest.mark.parametrize(
    "content, reason",
    [
        ("truncated", "truncated image"),
        ("empty", "empty file"),
        ("text", "not an image (cannot identify image file)"),
        ("half-png", "truncated image"),
    ],
)
def test_undecodable_files_raise_with_reason(tmp_path, content, reason):
    bad = tmp_path / "bad" / "x.JPEG"
    bad.parent.mkdir()
    if content == "truncated":
        data = _jpeg_bytes(tmp_path)
        bad.write_bytes(data[: len(data) // 2])
    elif content == "empty":
        bad.write_bytes(b"")
    elif content == "text":
        bad.write_text("this is a text file, not a JPEG\n")
    else:
        png = make_case(tmp_path, "palette-png").read_bytes()
        bad.write_bytes(png[: len(png) // 2])
    with pytest.raises(ImageDecodeError) as info:
        open_rgb(bad)
    assert info.value.path == bad
    assert info.value.reason == reason
    assert str(bad) in str(info.value)
    assert isinstance(info.value, ImzarrError)
    with pytest.raises(ImageDecodeError):
        load_and_resize(bad, DEFAULT_RECIPE, S)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot read file"):
        open_rgb(tmp_path / "absent.JPEG")
    with pytest.raises(ImageDecodeError, match="cannot read file"):
        open_rgb(tmp_path)


def test_decompression_bomb(tmp_path, monkeypatch):
    path = make_case(tmp_path, "small-20x30")
    # Pillow refuses images over twice MAX_IMAGE_PIXELS; a tiny limit makes a 20×30 image a "bomb".
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError) as info:
        open_rgb(path)
    assert info.value.reason == "decompression bomb (image too large)"


# --- fast draft ------------------------------------------------------------------------------------------


def test_fast_draft_is_opt_in_and_needs_size(tmp_path):
    path = make_case(tmp_path, "rgb-500x375")
    assert open_rgb(path).size == (500, 375)
    with pytest.raises(ValueError):
        open_rgb(path, fast_draft=True)
    # DCT scaling by 2 keeps the short side ≥ 2·64; the partial edge block is trimmed: (500//2, 375//2).
    assert open_rgb(path, fast_draft=True, draft_size=S).size == (250, 187)
    # Too small to scale, or not a JPEG: exact decode.
    assert open_rgb(path, fast_draft=True, draft_size=200).size == (500, 375)
    png = make_case(tmp_path, "png-named-jpeg")
    np.testing.assert_array_equal(
        load_and_resize(png, "adm-center-crop", S, fast_draft=True), load_and_resize(png, "adm-center-crop", S)
    )


# Bounds on the mean |Δ| of a fast draft from the exact recipe, in uint8 levels. Measured with Pillow 13 /
# libjpeg-turbo (edm / adm / box): 500×375: 0.33 / 0.95 / 0.87;  375×501: 0.31 / 1.14 / 0.89;  1030×777:
# 0.24 / 1.42 / 0.91. edm and box place their crop on the full image's grid in fractional reduced pixels; a
# whole-pixel crop of the reduced image gave edm 0.93 / 1.77 / 1.69 (a shift and shrink of up to a reduced pixel).
# adm's halvings are whole pixels by definition. Headroom for other libjpeg builds.
FAST_DRAFT_BOUND = {"edm-center-crop": 0.6, "adm-center-crop": 2.5, "box": 1.5}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_fast_draft_deviation_is_small(tmp_path, recipe):
    for case in ["rgb-500x375", "rgb-375x500-odd", "big-1030x777"]:
        path = make_case(tmp_path, case)
        exact = load_and_resize(path, recipe, S).astype(np.int16)
        fast = load_and_resize(path, recipe, S, fast_draft=True).astype(np.int16)
        assert fast.shape == (3, S, S)
        mad = np.abs(fast - exact).mean()
        assert 0 < mad < FAST_DRAFT_BOUND[recipe], (case, mad)


def test_unknown_recipe_suggests_the_close_one():
    with pytest.raises(RecipeError, match=r"^recipe 'adm_center_crop': unknown recipe \(valid recipes: adm-center-crop, box, edm-center-crop\); did you mean adm-center-crop"):
        load_and_resize("unused.JPEG", "adm_center_crop", S)
