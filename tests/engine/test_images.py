"""Every case from real files written here and decoded by PIL."""

import numpy as np
import pytest
from PIL import Image

from imagic.engine.images import ImageError, fit_image, load_image, unfit_image


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    r, g, b = loaded.getpixel((10, 3))  # the left strip is now at the top
    assert r > 200 and g < 60 and b < 60


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    image.save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((4, 4)) == (255, 255, 255) and loaded.getpixel((0, 0)) == (0, 0, 255)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 255, 0] + [255, 0, 0] * 255)
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "p.png", transparency=0)
    loaded = load_image(tmp_path / "p.png")
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 1)) == (255, 0, 0)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_grayscale(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    assert load_image(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)


def test_16_bit_uses_the_full_range(tmp_path):
    array = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(array).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    loaded = np.asarray(load_image(tmp_path / "deep.png"))
    assert loaded.min() == 0 and loaded.max() == 255 and loaded[4, 4, 0] == loaded[4, 4, 2]


def test_non_image_names_the_input(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a picture")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        load_image(tmp_path / "notes.png")


def test_truncated_image(tmp_path):
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: image data is corrupt or truncated"):
        load_image(tmp_path / "cut.png")


def test_decompression_bomb(tmp_path):
    Image.new("1", (4000, 4000)).save(tmp_path / "bomb.png")  # 16 MP in a few kB
    assert (tmp_path / "bomb.png").stat().st_size < 10_000
    with pytest.raises(ImageError, match=r"bomb\.png: image is 4000x4000 = 16,000,000 pixels, over the limit"):
        load_image(tmp_path / "bomb.png", max_pixels=1_000_000)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "missing.png")


def test_bytes_use_the_given_name():
    with pytest.raises(ImageError, match="s3://bucket/x.png: not an image"):
        load_image(b"GIF89a-nonsense", name="s3://bucket/x.png")


def test_fit_crop_fills_and_pad_keeps_everything():
    wide = Image.new("RGB", (200, 100), "red")
    wide.paste((0, 0, 255), (0, 0, 20, 100))  # blue strip at the far left
    (cropped, crop), (padded, _) = fit_image(wide, 64, "crop"), fit_image(wide, 64, "pad")
    assert cropped.size == padded.size == (64, 64)
    assert crop == {"mode": "crop", "original_size": [200, 100], "size": [64, 64], "box": [50, 0, 150, 100]}
    assert cropped.getpixel((0, 32)) == (255, 0, 0)  # the strip was cropped away
    assert padded.getpixel((1, 32))[2] > 200  # the strip survives
    assert padded.getpixel((32, 2)) == (255, 255, 255)  # padding
    with pytest.raises(ValueError, match="fit mode"):
        fit_image(wide, 64, "stretch")


@pytest.mark.parametrize("size, expected, box", [((200, 100), (88, 48), [8, 0, 191, 100]),
                                                 ((100, 200), (48, 88), [0, 8, 100, 191]),
                                                 ((640, 360), (88, 48), [0, 5, 640, 354]),
                                                 ((64, 64), (64, 64), [0, 0, 64, 64])])
def test_fit_keep_holds_the_aspect_at_about_the_native_area(size, expected, box):
    image = Image.new("RGB", size, "red")
    image.paste((0, 0, 255), (0, 0, size[0] // 10, size[1]))  # a strip at the far left survives
    kept, transform = fit_image(image, 64, "keep", multiple=8)
    assert kept.size == expected and all(side % 8 == 0 for side in kept.size)
    assert abs(kept.width * kept.height - 64 * 64) / (64 * 64) < 0.1
    assert kept.getpixel((0, kept.height // 2))[2] > 200
    assert transform == {"mode": "keep", "original_size": list(size), "size": list(expected), "box": box}


@pytest.mark.parametrize("mode", ["keep", "crop", "pad"])
def test_unfit_puts_an_output_back_at_the_inputs_size_where_the_model_saw_it(mode):
    """A fitted input sent back through `unfit_image` is the input again, up to two resamplings."""
    wide = Image.new("RGB", (200, 100), "red")
    wide.paste((0, 0, 255), (90, 30, 110, 70))  # a blue square in the middle
    fitted, transform = fit_image(wide, 64, mode, multiple=8)
    back = unfit_image(fitted, wide, transform)
    assert back.size == wide.size
    assert np.abs(np.asarray(back, int) - np.asarray(wide, int)).mean() < 3
    assert back.getpixel((100, 50))[2] > 200 and back.getpixel((100, 10)) == (255, 0, 0)
    if mode == "crop":  # the sides the model never saw are the input's own
        assert np.array_equal(np.asarray(back)[:, :50], np.asarray(wide)[:, :50])
