"""Image loading (modes, EXIF, sources, errors) and the encoder transform."""

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vision.preprocess import ImageError, border_colour, build_transform, load_image


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height: enough for PIL to open it, never decoded."""
    data = bytearray(_png_bytes(Image.new("L", (1, 1))))
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _pixel(img, xy=(0, 0)):
    assert img.mode == "RGB"
    return img.getpixel(xy)


def test_rgba_and_la_composite_on_white():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (200, 10, 10, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    out = load_image(rgba)
    assert _pixel(out, (0, 0)) == (255, 255, 255)
    assert _pixel(out, (1, 1)) == (200, 10, 10)
    assert all(abs(c - 127) <= 1 for c in _pixel(out, (1, 0)))  # half-transparent black on white
    assert _pixel(load_image(Image.new("LA", (2, 2), (30, 0)))) == (255, 255, 255)
    assert _pixel(load_image(Image.new("LA", (2, 2), (30, 255)))) == (30, 30, 30)


def test_palette_with_transparency_and_grey():
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert _pixel(load_image(p)) == (10, 200, 30)
    p.info["transparency"] = 1
    assert _pixel(load_image(_png_bytes(p))) == (255, 255, 255)
    assert _pixel(load_image(Image.new("L", (3, 3), 77))) == (77, 77, 77)


def test_16_bit_is_scaled_not_clipped():
    arr = np.array([[0, 257 * 128], [65535, 1000]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    for source in (img, _png_bytes(img)):  # a 16-bit PNG reopens as I;16 or I depending on Pillow
        out = np.asarray(load_image(source))[..., 0]
        assert out.tolist() == [[0, 128], [255, 4]]
    wide = Image.fromarray(arr.astype(np.int32))
    assert wide.mode == "I"
    assert np.asarray(load_image(wide))[1, 0, 0] == 255


def test_float_and_cmyk():
    f = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32))
    assert np.asarray(load_image(f))[..., 1].tolist() == [[0, 128], [255, 64]]
    assert _pixel(load_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))) == (255, 0, 0)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (220, 30, 30))
    img.paste((30, 30, 220), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display after rotating 90 degrees clockwise
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    out = load_image(buf.getvalue())
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 180 and top[2] < 80  # the left (red) half is now on top
    assert bottom[2] > 180 and bottom[0] < 80


def test_sources_path_bytes_file(tmp_path):
    img = Image.new("RGB", (5, 3), (1, 2, 3))
    path = tmp_path / "x.png"
    img.save(path)
    data = path.read_bytes()
    for source in (path, str(path), data, bytearray(data), io.BytesIO(data)):
        out = load_image(source)
        assert out.size == (5, 3) and _pixel(out) == (1, 2, 3)


def test_errors_name_the_source(tmp_path):
    with pytest.raises(ImageError, match="bytes of length 12.*not a readable image"):
        load_image(b"not an image")
    with pytest.raises(ImageError, match="bytes of length 0"):
        load_image(b"")
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="nope.jpg: no such file"):
        load_image(missing)
    with pytest.raises(ImageError, match="zero-size"):
        load_image(Image.new("RGB", (0, 4)))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(ImageError, match="broken.jpg"):
        load_image(broken)
    assert issubclass(ImageError, ValueError)


def test_decompression_bomb_is_refused_from_the_header():
    big = _png_with_header_size(10_000, 10_000)  # 1e8 pixels: over our cap, under PIL's hard limit
    with pytest.raises(ImageError, match=r"bytes of length \d+: 10000x10000 = 100000000 pixels"):
        load_image(big)
    with pytest.raises(ImageError, match="10000x10000"):
        load_image(big, max_pixels=50_000_000)
    with pytest.raises(ImageError, match="120x100 = 12000 pixels is over the limit of 10000"):
        load_image(_png_bytes(Image.new("L", (120, 100))), max_pixels=10_000)
    huge = _png_with_header_size(20_000, 20_000)  # beyond PIL's own limit even with our cap off
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(huge, max_pixels=0)


def test_transform_normalises_exactly_when_no_resize():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tf = build_transform(dict(input_size=(3, 16, 16), mean=mean, std=std, interpolation="bicubic"))
    out = tf(Image.fromarray(arr))
    ref = (torch.from_numpy(arr).permute(2, 0, 1).double() / 255 - torch.tensor(mean)[:, None, None].double())
    ref = ref / torch.tensor(std)[:, None, None].double()
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_transform_keeps_aspect_by_padding_with_the_border_colour():
    img = Image.new("RGB", (60, 20), (255, 255, 255))
    img.paste((255, 0, 0), (25, 5, 35, 15))  # a 10x10 red square in the middle
    tf = build_transform(image_size=32, mean=(0.0,) * 3, std=(1.0,) * 3)
    out = tf(img)
    assert out.shape == (3, 32, 32)
    assert border_colour(img) == (255, 255, 255)
    band = (out[1] < 0.5).nonzero()  # green channel: only the red square is dark
    rows, cols = band[:, 0], band[:, 1]
    height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    assert abs(height - width) <= 1 and 4 <= width <= 7  # still square, 10 px * 32 / 60 ~ 5 px
    assert out[:, :10].min() == 1.0 and out[:, 22:].min() == 1.0  # white padding above and below
    assert 14 <= float(rows.float().mean()) <= 17 and 14 <= float(cols.float().mean()) <= 17  # centred
    square = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    resized = np.asarray(square.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    torch.testing.assert_close(tf(square), torch.from_numpy(resized).permute(2, 0, 1))  # only resized
    assert torch.equal(out, tf(img))
    assert torch.equal(pickle.loads(pickle.dumps(tf))(img), out)  # works in spawned workers
    nearest = build_transform(dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3,
                                  interpolation="nearest"))
    assert nearest.interpolation == "nearest"
    assert nearest(img).unique().numel() == 2 < out.unique().numel()  # nearest never blends colours
    with pytest.raises(ValueError, match="input_size"):
        build_transform(dict(mean=(0.5,) * 3, std=(0.5,) * 3))
