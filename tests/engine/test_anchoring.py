"""Anchored rendering: each option does what it claims and nothing else; the paper's path is unchanged."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from imagic import make_config
from imagic.engine.anchoring import ddim_invert, edit_mask
from imagic.engine.grid import interpolate
from imagic.toy import Scene, measure, render

from .test_editor import pixels, same_images


@pytest.fixture
def embeddings(editor):
    return editor.encode_text("a blue circle"), editor.encode_text("a red square")


@pytest.fixture
def latents(editor, scene, quick_config):
    return editor.encode_image(scene.resize((editor.resolution, editor.resolution)), quick_config())


def paper_render(editor, e_tgt, e_opt, etas, seeds, config):
    """Stage C exactly as it was before anchoring existed (seed noise, empty-text guidance)."""
    uncond = editor.encode_text("")
    scheduler = DDIMScheduler.from_config(editor.pipeline.scheduler.config)
    shape = (1, editor.unet.config.in_channels, editor.unet.config.sample_size, editor.unet.config.sample_size)
    images = {}
    for eta, seed in [(e, s) for s in seeds for e in etas]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        embeddings = torch.cat([uncond, interpolate(e_tgt, e_opt, eta)])
        scheduler.set_timesteps(config.num_inference_steps)
        x = x * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                prediction = editor.unet(torch.cat([x, x]), t, encoder_hidden_states=embeddings).sample
                u, c = prediction.chunk(2)
                x = scheduler.step(u + config.guidance_scale * (c - u), t, x).prev_sample
        images[(eta, seed)] = editor.decode_latents(x, config)[0]
    return images


def test_the_paper_path_renders_as_before(editor, embeddings, quick_config):
    config = quick_config("paper", render_batch_size=1)
    etas, seeds = [0.0, 0.7, 1.0], [0, 5]
    assert same_images(editor.render(*embeddings, etas, seeds, config), paper_render(editor, *embeddings, etas, seeds, config))


def test_inversion_then_ddim_gives_the_latents_back_on_the_toy_model(toy_editor):
    editor = toy_editor
    image = render(Scene("circle", "red", "black", 12.0, 19.0, 14.0), np.random.default_rng(0))
    config = make_config("paper")
    latents = editor.encode_image(image, config)
    e = editor.encode_text("a red circle on black background")
    scheduler = DDIMScheduler.from_config(editor.pipeline.scheduler.config)
    scheduler.set_timesteps(50)
    predict = lambda x, t: editor.unet(x, t, encoder_hidden_states=e).sample  # noqa: E731
    trajectory = ddim_invert(predict, latents, scheduler, 50)
    assert len(trajectory) == 51 and torch.equal(trajectory[0], latents)
    x = trajectory[-1]
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(predict(x, t), t, x).prev_sample
    back = measure(editor.decode_latents(x, config)[0])
    original = measure(image)
    assert back.attributes() == original.attributes()
    assert np.hypot(back.cx - original.cx, back.cy - original.cy) < 1.0
    # Not a trivial pass: the start point is noise-like, far from the latents.
    assert (trajectory[-1] - latents).abs().mean() > 0.5


def test_anchored_eta_zero_reproduces_the_input_on_the_toy_model(toy_editor):
    editor = toy_editor
    scene = Scene("square", "green", "gray", 20.0, 11.0, 13.0)
    image = render(scene, np.random.default_rng(3))
    config = make_config("anchored", embedding_steps=100, finetune_steps=150, score_outputs=False)
    result = editor.edit(image, "a green circle on gray background", config, etas=[0.0], seeds=[0])
    m, original = measure(result.images[(0.0, 0)]), measure(image)
    assert m.attributes() == original.attributes()
    assert np.hypot(m.cx - original.cx, m.cy - original.cy) <= 1.0


def test_anchor_fraction_one_renders_e_opt_for_every_eta(editor, embeddings, latents, quick_config):
    config = quick_config(render_start="inversion", anchor_fraction=1.0)
    images = editor.render(*embeddings, [0.0, 1.0], [0], config, latents)
    assert np.array_equal(pixels(images[(0.0, 0)]), pixels(images[(1.0, 0)]))
    plain = editor.render(*embeddings, [0.0, 1.0], [0], quick_config(render_start="inversion"), latents)
    assert np.array_equal(pixels(plain[(0.0, 0)]), pixels(images[(0.0, 0)]))  # η=0 itself unchanged
    assert not np.array_equal(pixels(plain[(1.0, 0)]), pixels(images[(1.0, 0)]))


def test_attention_injection_changes_edits_not_the_source(toy_editor):
    editor = toy_editor
    processors = dict(editor.unet.attn_processors)
    config = make_config("paper", render_start="inversion", num_inference_steps=10)
    image = render(Scene("circle", "red", "black", 12.0, 19.0, 14.0), np.random.default_rng(0))
    latents = editor.encode_image(image, config)
    e_tgt = editor.encode_text("a blue square on white background")
    e_opt = editor.encode_text("a red circle on black background")
    plain = editor.render(e_tgt, e_opt, [0.0, 1.0], [0], config, latents)
    injected = editor.render(e_tgt, e_opt, [0.0, 1.0], [0],
                             config.model_copy(update={"attention_injection": 1.0}), latents)
    # The η=0 image *is* the source (float noise of another batch layout aside); edits change.
    source = np.abs(pixels(plain[(0.0, 0)]) - pixels(injected[(0.0, 0)])).mean()
    edit = np.abs(pixels(plain[(1.0, 0)]) - pixels(injected[(1.0, 0)])).mean()
    assert source < 0.5 and edit > 10 * source, (source, edit)
    assert {k: type(v) for k, v in editor.unet.attn_processors.items()} == {k: type(v) for k, v in processors.items()}


def test_unconditional_model_acts_only_through_guidance(editor, scene, quick_config):
    config = quick_config("fast", render_start="inversion")
    for guidance, same in ((1.0, True), (3.0, False)):
        a = editor.edit(scene, "a blue circle", config.model_copy(update={"guidance_scale": guidance}), [1.0])
        b = editor.edit(scene, "a blue circle", config.model_copy(update={"guidance_scale": guidance,
                                                                          "unconditional_model": "base"}), [1.0])
        assert same_images(a.images, b.images) is same, guidance


def test_negative_embedding_e_opt_makes_eta_zero_unguided(editor, embeddings, latents, quick_config):
    config = quick_config(render_start="inversion", negative_embedding="e_opt")
    guided = editor.render(*embeddings, [0.0, 1.0], [0], config, latents)
    unguided = editor.render(*embeddings, [0.0, 1.0], [0], config.model_copy(update={"guidance_scale": 1.0}), latents)
    assert np.array_equal(pixels(guided[(0.0, 0)]), pixels(unguided[(0.0, 0)]))  # uncond == cond at η=0
    assert not np.array_equal(pixels(guided[(1.0, 0)]), pixels(unguided[(1.0, 0)]))


def test_inversion_strength_keeps_more_of_the_input(editor, scene, embeddings, latents, quick_config):
    config = quick_config(render_start="inversion", num_inference_steps=10)
    reference = np.asarray(scene.resize((editor.resolution, editor.resolution)), np.float32)
    distance = {}
    for strength in (1.0, 0.3):
        image = editor.render(*embeddings, [1.0], [0], config.model_copy(update={"inversion_strength": strength}),
                              latents)[(1.0, 0)]
        distance[strength] = np.abs(np.asarray(image, np.float32) - reference).mean()
    assert distance[0.3] < distance[1.0]


def test_edit_mask_marks_where_the_texts_disagree(editor, embeddings, latents):
    predict = lambda x, t, e: editor.unet(x, t, encoder_hidden_states=e).sample  # noqa: E731
    mask = edit_mask(predict, latents, editor.noise_scheduler, *embeddings, torch.Generator().manual_seed(0))
    assert mask.shape == (1, 1, *latents.shape[2:]) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum() >= 1  # the largest difference is always inside
    same = edit_mask(predict, latents, editor.noise_scheduler, embeddings[0], embeddings[0],
                     torch.Generator().manual_seed(0), threshold=0.5)
    assert same.sum() == 0  # identical texts: nothing to edit


def test_seeds_vary_an_inverted_start_only_through_inversion_noise(editor, embeddings, latents, quick_config):
    config = quick_config(render_start="inversion")
    plain = editor.render(*embeddings, [1.0], [0, 1], config, latents)
    assert np.array_equal(pixels(plain[(1.0, 0)]), pixels(plain[(1.0, 1)]))
    noisy = editor.render(*embeddings, [1.0], [0, 1], config.model_copy(update={"inversion_noise": 0.5}), latents)
    assert not np.array_equal(pixels(noisy[(1.0, 0)]), pixels(noisy[(1.0, 1)]))


def test_ddpm_inversion_gives_the_input_back_at_eta_zero_for_every_seed(editor, embeddings, latents, quick_config):
    """Edit-friendly noise maps: at e_opt (η=0) the stochastic render lands on the input's latents exactly,
    guidance included; at η=1 each seed's maps make another candidate."""
    config = quick_config(render_start="ddpm_inversion", num_inference_steps=10)
    images = editor.render(*embeddings, [0.0, 1.0], [0, 1], config, latents)
    reference = pixels(editor.decode_latents(latents, config)[0]).astype(int)
    for seed in (0, 1):
        assert np.abs(pixels(images[(0.0, seed)]).astype(int) - reference).max() <= 1, seed
    assert not np.array_equal(pixels(images[(1.0, 0)]), pixels(images[(1.0, 1)]))
    assert np.abs(pixels(images[(1.0, 0)]).astype(int) - reference).mean() > 1  # the edit is not the input
    ddim = editor.render(*embeddings, [0.0], [0], quick_config(render_start="inversion", num_inference_steps=10),
                         latents)  # DDIM inversion's own error, which the noise maps do not have
    assert np.abs(pixels(ddim[(0.0, 0)]).astype(int) - reference).mean() > 1


def test_ddpm_inversion_strength_is_its_skip(editor, embeddings, latents, quick_config):
    config = quick_config(render_start="ddpm_inversion", num_inference_steps=10)
    reference = pixels(editor.decode_latents(latents, config)[0]).astype(np.float32)
    distance = {strength: np.abs(pixels(editor.render(
        *embeddings, [1.0], [0], config.model_copy(update={"inversion_strength": strength}), latents)[(1.0, 0)])
        - reference).mean() for strength in (1.0, 0.3)}
    assert distance[0.3] < distance[1.0]
    with pytest.raises(ValueError, match="each seed draws its own noise maps"):
        quick_config(render_start="ddpm_inversion", inversion_noise=0.5)


OPTIONS = {
    "render_start": ["noise", "inversion", "ddpm_inversion"],
    "anchor_fraction": [0.0, 0.4],
    "attention_injection": [0.0, 0.5],
    "unconditional_model": ["finetuned", "base"],
    "negative_embedding": ["empty", "e_opt"],
    "mask_threshold": [0.0, 0.5],
}


@pytest.mark.parametrize("finetune_method", ["lora", "full"])
def test_every_combination_renders_deterministically(editor, scene, quick_config, finetune_method):
    preset = "fast" if finetune_method == "lora" else "community"
    base_state = {k: v.clone() for k, v in editor.unet.state_dict().items()}
    for values in itertools.product(*OPTIONS.values()):
        options = dict(zip(OPTIONS, values))
        if options["render_start"] == "noise" and options["mask_threshold"]:
            with pytest.raises(ValueError, match="mask_threshold"):
                quick_config(preset, **options)
            continue
        config = quick_config(preset, embedding_steps=2, finetune_steps=2, num_inference_steps=3,
                              score_outputs=False, **options)
        first = editor.edit(scene, "a blue circle", config, [0.0, 1.0], [0])
        second = editor.edit(scene, "a blue circle", config, [0.0, 1.0], [0])
        assert same_images(first.images, second.images), options
    assert all(torch.equal(base_state[k], v) for k, v in editor.unet.state_dict().items())
