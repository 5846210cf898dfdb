"""The toy world's scenes: captions that parse back, scenes that fit, renders that repeat."""

import numpy as np
import pytest

from imagic.toy.scenes import BACKGROUNDS, COLORS, RESOLUTION, Scene, caption, parse_caption, random_scene, render


def test_a_caption_parses_back_to_its_scenes_attributes():
    scene = random_scene(np.random.default_rng(3))
    assert parse_caption(caption(scene)) == {"color": scene.color, "shape": scene.shape,
                                             "background": scene.background}
    assert parse_caption("  A Red Circle on black background ") == {"color": "red", "shape": "circle",
                                                                    "background": "black"}


@pytest.mark.parametrize("text", ["a dog sitting", "a purple circle on black background", "a red circle"])
def test_what_is_not_a_toy_caption_is_a_clear_error(text):
    with pytest.raises(ValueError, match="toy caption|unknown color"):
        parse_caption(text)


def test_random_scenes_fit_in_the_frame_and_keep_what_is_fixed():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = random_scene(rng, color="blue")
        assert s.color == "blue" and s.size / 2 < s.cx < RESOLUTION - s.size / 2
        assert s.size / 2 < s.cy < RESOLUTION - s.size / 2


def test_renders_repeat_exactly_and_noise_only_with_a_generator():
    scene = Scene("square", "red", "black", 16.0, 16.0, 12.0)
    clean = np.asarray(render(scene), int)
    assert np.array_equal(clean, np.asarray(render(scene), int))
    assert tuple(clean[16, 16]) == COLORS["red"] and tuple(clean[1, 1]) == BACKGROUNDS["black"]
    photo = [np.asarray(render(scene, np.random.default_rng(7)), int) for _ in range(2)]
    assert np.array_equal(*photo) and not np.array_equal(photo[0], clean)
    assert render(scene, resolution=64).size == (64, 64)
