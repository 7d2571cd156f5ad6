"""load_image: every odd mode becomes sensible RGB; every broken file raises BadImageError."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlkit.data.images import BadImageError, load_image, to_rgb


def _save(tmp_path, image, name, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def _rgb(path, **kw):
    image = load_image(path, **kw)
    assert image.mode == "RGB"
    return np.asarray(image)


@pytest.mark.parametrize(
    "mode, name",
    [("1", "a.png"), ("L", "a.png"), ("LA", "a.png"), ("P", "a.png"), ("RGBA", "a.png"),
     ("CMYK", "a.jpg"), ("CMYK", "a.tif"), ("YCbCr", "a.tif"), ("I;16", "a.png"),
     ("I", "a.tif"), ("F", "a.tif"), ("RGB", "a.webp"), ("RGB", "a.bmp"), ("P", "a.gif")],
)
def test_every_mode_loads_as_rgb(tmp_path, mode, name):
    path = _save(tmp_path, Image.new(mode, (7, 5)), name)
    assert _rgb(path).shape == (5, 7, 3)


def test_grey_and_palette_values_are_kept(tmp_path):
    grey = Image.fromarray(np.full((3, 4), 77, np.uint8), "L")
    assert (_rgb(_save(tmp_path, grey, "g.png")) == 77).all()
    pal = Image.new("P", (4, 3), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    assert (_rgb(_save(tmp_path, pal, "p.png")) == [10, 20, 30]).all()


def test_alpha_is_composited_on_background(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = [255, 0, 0, 255]  # opaque red
    rgba[0, 1] = [255, 0, 0, 0]  # fully transparent red -> background
    rgba[1, 0] = [0, 0, 0, 128]  # half-transparent black -> grey
    out = _rgb(_save(tmp_path, Image.fromarray(rgba, "RGBA"), "a.png"))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert 120 <= out[1, 0, 0] <= 135
    black = _rgb(tmp_path / "a.png", background=(0, 0, 0))
    assert black[0, 1].tolist() == [0, 0, 0]
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    assert np.asarray(to_rgb(la))[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_palette_transparency_is_composited(tmp_path):
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # index 0 (black) transparent
    for name in ("t.png", "t.gif"):
        out = _rgb(_save(tmp_path, pal, name, transparency=0))
        assert out[0].tolist() == [[255, 255, 255], [0, 255, 0]], name


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], np.uint16)
    image = Image.fromarray(values)  # mode I;16
    assert image.mode.startswith("I;16")
    out = _rgb(_save(tmp_path, image, "deep.png"))[0, :, 0]
    assert out.tolist() == [0, 64, 128, 255]


def test_int32_and_float_are_rescaled(tmp_path):
    ints = Image.fromarray(np.array([[0, 1000, 65535]], np.int32), "I")
    assert _rgb(_save(tmp_path, ints, "i.tif"))[0, :, 0].tolist() == [0, 4, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert _rgb(_save(tmp_path, unit, "f.tif"))[0, :, 0].tolist() == [0, 128, 255]
    odd = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan]], np.float32), "F")
    assert np.asarray(to_rgb(odd))[0, :3, 0].tolist() == [0, 128, 255]


def test_cmyk_and_ycbcr_colours(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # red
    assert (_rgb(_save(tmp_path, cmyk, "c.tif")) == [255, 0, 0]).all()
    ycbcr = Image.new("RGB", (2, 2), (0, 0, 255)).convert("YCbCr")
    out = np.asarray(to_rgb(ycbcr)).astype(int)
    assert np.abs(out - [0, 0, 255]).max() <= 3


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (6, 2), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(tmp_path, image, "o.jpg", exif=exif.tobytes())
    assert load_image(path).size == (2, 6)


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def _png_header(width, height):
    """A valid PNG signature + IHDR (8-bit grey) + a cut-off IDAT: cheap to write at any size."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(bytes(range(72)))[:30])
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + _chunk(b"IEND", b"")


def _broken_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(good)
    jpg = tmp_path / "good.jpg"
    Image.open(good).save(jpg, quality=90)
    files = {
        "empty": b"",
        "text": b"hello, I am not an image\n" * 10,
        "random": np.random.default_rng(1).bytes(2048),
        "truncated_png": good.read_bytes()[: good.stat().st_size // 2],
        "truncated_jpg": jpg.read_bytes()[: jpg.stat().st_size // 2],
        "header_only_png": _png_header(8, 8),
        "bomb_png": _png_header(200_000, 200_000),
    }
    for name, data in files.items():
        (tmp_path / f"{name}.img").write_bytes(data)
    return {name: tmp_path / f"{name}.img" for name in files}


def test_broken_files_raise_bad_image_error(tmp_path):
    expected = {"empty": "empty file", "text": "not an image", "random": "not an image",
                "truncated_png": "corrupt or truncated", "truncated_jpg": "corrupt or truncated",
                "header_only_png": "corrupt or truncated", "bomb_png": "decompression bomb"}
    for name, path in _broken_files(tmp_path).items():
        with pytest.raises(BadImageError) as info:
            load_image(path)
        assert str(path) in str(info.value) and info.value.path == str(path)
        assert info.value.reason.startswith(expected[name]), (name, info.value.reason)
        assert isinstance(info.value, ValueError)


def test_missing_file_and_pixel_budget(tmp_path):
    with pytest.raises(BadImageError, match="nope.png: file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(BadImageError, match="is a directory"):
        load_image(tmp_path)
    path = _save(tmp_path, Image.new("RGB", (20, 20)), "big.png")
    with pytest.raises(BadImageError, match="big.png: decompression bomb: 20x20"):
        load_image(path, max_pixels=399)
    assert load_image(path, max_pixels=400).size == (20, 20)


def test_truncated_images_flag_is_left_alone(tmp_path):
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(BadImageError):
        load_image(_broken_files(tmp_path)["truncated_jpg"])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
