"""The oracle must read attributes back from clean renders, textured renders and degraded images."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from imagic.toy import BACKGROUNDS, COLORS, SHAPES, Scene, caption, measure, parse_caption, random_scene, render


def accuracy(scenes, images):
    hits = {"shape": 0, "color": 0, "background": 0}
    shifts, size_errors = [], []
    for scene, image in zip(scenes, images):
        m = measure(image)
        for key in hits:
            hits[key] += getattr(m, key) == getattr(scene, key)
        shifts.append(np.hypot(m.cx - scene.cx, m.cy - scene.cy))
        size_errors.append(abs(m.size - scene.size) / scene.size)
    n = len(scenes)
    return {k: v / n for k, v in hits.items()}, max(shifts), max(size_errors)


@pytest.mark.parametrize("textured", [False, True])
def test_oracle_reads_generated_scenes(textured):
    rng = np.random.default_rng(7)
    scenes = [random_scene(rng) for _ in range(300)]
    images = [render(s, rng if textured else None) for s in scenes]
    acc, worst_shift, worst_size = accuracy(scenes, images)
    assert min(acc.values()) >= 0.99, acc
    assert worst_shift < 0.5 and worst_size < 0.08


def test_oracle_survives_blur_noise_and_upscaling():
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng) for _ in range(100)]
    images = []
    for scene in scenes:
        image = render(scene, rng).filter(ImageFilter.GaussianBlur(0.8))
        noisy = np.asarray(image, float) + rng.normal(0, 12, (32, 32, 3))
        images.append(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).resize((128, 128)))
    acc, worst_shift, _ = accuracy(scenes, images)
    assert min(acc.values()) >= 0.95, acc
    assert worst_shift < 1.5


def test_empty_image_has_no_shape():
    m = measure(Image.new("RGB", (32, 32), BACKGROUNDS["gray"]))
    assert m.shape is None and m.color is None and m.background == "gray"


def test_every_combination_is_told_apart():
    for shape in SHAPES:
        for color in COLORS:
            for background in BACKGROUNDS:
                scene = Scene(shape, color, background, 16.0, 16.0, 14.0)
                assert measure(render(scene)).attributes() == {"shape": shape, "color": color, "background": background}


def test_captions_round_trip():
    scene = Scene("triangle", "yellow", "black", 10, 12, 11)
    assert caption(scene) == "a yellow triangle on black background"
    assert parse_caption(caption(scene)) == {"color": "yellow", "shape": "triangle", "background": "black"}
    with pytest.raises(ValueError, match="unknown color 'purple'"):
        parse_caption("a purple circle on white background")
    with pytest.raises(ValueError, match="not a toy caption"):
        parse_caption("a photo of a dog")


def test_scenes_are_deterministic_for_a_seed():
    a = render(random_scene(np.random.default_rng(5)), np.random.default_rng(6))
    b = render(random_scene(np.random.default_rng(5)), np.random.default_rng(6))
    assert np.array_equal(np.asarray(a), np.asarray(b))
