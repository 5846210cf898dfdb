"""Scores from the editing model itself: deterministic, and they measure what they claim."""

import numpy as np
from PIL import Image, ImageChops

from imagic.engine.scores import (FIDELITY_MEASURES, score_outputs, silhouette_similarity, structure_similarity,
                                  text_margins)

from tests.conftest import draw_scene


def test_structure_similarity_keeps_colour_changes_and_punishes_moves():
    red = draw_scene((200, 30, 30), size=64)
    blue = draw_scene((30, 30, 200), size=64)
    moved = ImageChops.offset(red, 14, 9)
    assert structure_similarity(red, red) > 0.999
    assert structure_similarity(red, blue) > 0.9  # same edges, other colour
    assert structure_similarity(red, moved) < 0.5
    flat = Image.new("RGB", (64, 64), (128, 128, 128))
    assert structure_similarity(red, flat) == 0.0


def test_silhouette_forgives_new_colours_and_outlines_in_place_and_punishes_moves_and_shrinking():
    red = draw_scene((200, 30, 30), size=64)
    other = Image.new("RGB", (64, 64), (20, 20, 20))  # new background, new colour, a square where the circle was
    other.paste((30, 200, 30), (16, 16, 48, 48))
    assert silhouette_similarity(red, other) > 0.8 > structure_similarity(red, other)
    assert silhouette_similarity(red, ImageChops.offset(red, 14, 9)) < 0.5
    smaller = Image.new("RGB", (64, 64), (240, 240, 240))
    smaller.paste(red.resize((40, 40)), (12, 12))
    assert silhouette_similarity(red, smaller) < silhouette_similarity(red, red) - 0.05
    assert all(abs(measure(red, red) - 1.0) < 1e-6 for measure in FIDELITY_MEASURES.values())


def test_scores_are_deterministic_for_a_seed(editor, scene, quick_config):
    config = quick_config()
    e_tgt, e_opt = editor.encode_text("a blue circle"), editor.encode_text("a red circle")
    images = {(1.0, 0): draw_scene((30, 30, 200)), (0.5, 0): scene}
    first = score_outputs(editor, scene, images, e_tgt, e_opt, config)
    again = score_outputs(editor, scene, images, e_tgt, e_opt, config)
    assert first == again and set(first) == set(images)
    latents = editor.encode_image(images[(1.0, 0)], config)
    assert not np.array_equal(text_margins(editor, latents, e_tgt, e_opt, 0), text_margins(editor, latents, e_tgt, e_opt, 7))
    assert first[(0.5, 0)]["edit"] == 0.0 and first[(0.5, 0)]["fidelity"] > 0.999  # the input scores itself 0


def test_text_margin_is_antisymmetric_in_the_two_texts(editor, scene, quick_config):
    latents = editor.encode_image(scene.resize((editor.resolution, editor.resolution)), quick_config())
    a, b = editor.encode_text("a blue circle"), editor.encode_text("a red square")
    forward, backward = text_margins(editor, latents, a, b, 0), text_margins(editor, latents, b, a, 0)
    assert np.allclose(forward.numpy(), -backward.numpy(), atol=1e-6) and abs(float(forward)) > 0


def test_edit_score_ranks_a_text_match_above_a_mismatch_on_the_toy_model(toy_editor):
    """The toy model as a zero-shot classifier: the target's own render beats the input."""
    from imagic import make_config
    from imagic.toy import Scene, render

    editor, config = toy_editor, make_config()
    source = Scene("circle", "red", "black", 16.0, 16.0, 14.0)
    inputs, wanted = render(source, np.random.default_rng(0)), render(source.with_(color="blue"), np.random.default_rng(0))
    e_tgt = editor.encode_text("a blue circle on black background")
    e_src = editor.encode_text("a red circle on black background")
    scores = score_outputs(editor, inputs, {(1.0, 0): wanted}, e_tgt, e_src, config)
    assert scores[(1.0, 0)]["edit"] > 0.1
    assert scores[(1.0, 0)]["fidelity"] > 0.8


def test_optional_clip_scores_with_a_tiny_clip_built_in_code(editor, scene, quick_config, tmp_path):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from imagic.toy.tiny import make_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=1000, max_position_embeddings=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer = make_clip_tokenizer(("blue", "circle", "red"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path)

    with_clip = quick_config(clip_model=str(tmp_path))
    e = editor.encode_text("a blue circle")
    images = {(1.0, 0): draw_scene((30, 30, 200)), (0.5, 0): scene}
    scores = score_outputs(editor, scene, images, e, e, with_clip, "a blue circle")
    assert all(-1 <= s["clip"] <= 1 and -1 <= s["clip_input"] <= 1 for s in scores.values())
    assert scores[(0.5, 0)]["clip_input"] > 0.999  # the input compared with itself
    assert scores[(1.0, 0)]["clip"] != scores[(0.5, 0)]["clip"]
    assert "clip" not in score_outputs(editor, scene, images, e, e, quick_config(), "a blue circle")[(1.0, 0)]


def test_every_fidelity_the_config_names_is_a_measure():
    from typing import get_args

    from imagic.engine.config import EditConfig

    assert set(get_args(EditConfig.model_fields["fidelity"].annotation)) == set(FIDELITY_MEASURES)
