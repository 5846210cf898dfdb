import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from imagic import EditResult, Editor, load_pipeline
from imagic.engine.sampling import training_target
from imagic.toy.tiny import build_tiny_pipeline

from tests.conftest import draw_scene


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def same_images(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(pixels(a[k]), pixels(b[k])) for k in a)


def unet_state(editor):
    return {k: v.clone() for k, v in editor.unet.state_dict().items()}


def eval_loss(editor, latents, embedding, config):
    """Denoising loss on a fixed set of 32 noise/timestep draws: comparable before and after training."""
    with torch.no_grad():
        fixed = config.model_copy(update={"train_batch_size": 32})
        [noise], [timesteps] = editor.training_draws(latents, 1, fixed, torch.Generator().manual_seed(1234))
        return editor.denoising_loss(latents, embedding, noise, timesteps, fixed).item()


@pytest.fixture
def encoded(editor, scene, quick_config):
    config = quick_config()
    image = scene.resize((editor.resolution, editor.resolution))
    return editor.encode_image(image, config), editor.encode_text("a blue circle")


def test_stage_a_lowers_the_loss_and_leaves_the_unet_untouched(editor, encoded, quick_config):
    latents, e_tgt = encoded
    config = quick_config(embedding_steps=60, embedding_lr=2e-2, train_batch_size=4)
    before = unet_state(editor)
    e_opt, losses = editor.optimize_embedding(latents, e_tgt, config, torch.Generator().manual_seed(0))
    assert len(losses) == 60
    assert eval_loss(editor, latents, e_opt, config) < eval_loss(editor, latents, e_tgt, config)
    assert not torch.equal(e_opt, e_tgt)
    assert all(p.grad is None and not p.requires_grad for p in editor.unet.parameters())
    assert all(torch.equal(before[k], v) for k, v in editor.unet.state_dict().items())


def test_stage_b_full_changes_the_unet_and_lowers_the_loss(editor, encoded, quick_config):
    latents, e_opt = encoded
    config = quick_config(finetune_steps=40, finetune_lr=1e-3, train_batch_size=4)
    before = unet_state(editor)
    loss_before = eval_loss(editor, latents, e_opt, config)
    try:
        delta, losses = editor.finetune(latents, e_opt, config, torch.Generator().manual_seed(0))
        assert len(losses) == 40
        assert eval_loss(editor, latents, e_opt, config) < loss_before
        changed = [k for k, v in editor.unet.state_dict().items() if not torch.equal(before[k], v)]
        assert len(changed) > len(before) // 2
        assert set(delta) == {name for name, _ in editor.unet.named_parameters()}
    finally:
        editor.restore()
    assert all(torch.equal(before[k], v) for k, v in editor.unet.state_dict().items())


def test_stage_b_lora_trains_only_lora_weights(editor, encoded, quick_config):
    latents, e_opt = encoded
    config = quick_config("fast", finetune_steps=40, finetune_lr=1e-2, lora_rank=4, train_batch_size=4)
    before = unet_state(editor)
    loss_before = eval_loss(editor, latents, e_opt, config)
    try:
        delta, _ = editor.finetune(latents, e_opt, config, torch.Generator().manual_seed(0))
        assert eval_loss(editor, latents, e_opt, config) < loss_before
        after = editor.unet.state_dict()
        lora = {k for k in after if "lora_" in k}
        assert lora and set(delta) == lora
        assert all(v.dtype == torch.float32 for v in delta.values())
        for name, value in after.items():
            if name not in lora:  # base weights, now wrapped by peft as `<layer>.base_layer.<param>`
                assert torch.equal(before[name.replace(".base_layer", "")], value), name
        assert any(v.abs().sum() > 0 for k, v in delta.items() if "lora_B" in k)  # B starts at zero
    finally:
        editor.restore()
    assert editor.unet.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in editor.unet.state_dict().items())


def test_render_at_eta_zero_renders_e_opt(editor, quick_config):
    config = quick_config()
    e_tgt, e_opt = editor.encode_text("a blue circle"), editor.encode_text("a red square")
    assert same_images(
        {0: editor.render(e_tgt, e_opt, [0.0], [0], config)[(0.0, 0)]},
        {0: editor.render(e_opt, e_tgt, [1.0], [0], config)[(1.0, 0)]},
    )


def test_batched_render_equals_one_at_a_time(editor, quick_config):
    e_tgt, e_opt = editor.encode_text("a blue circle"), editor.encode_text("a red square")
    etas, seeds = [0.0, 0.5, 1.0, 1.2], [0, 1, 2]
    batched = editor.render(e_tgt, e_opt, etas, seeds, quick_config(render_batch_size=12))
    single = editor.render(e_tgt, e_opt, etas, seeds, quick_config(render_batch_size=1))
    assert len(batched) == 12
    worst = max(np.abs(pixels(batched[k]) - pixels(single[k])).max() for k in batched)
    assert worst <= 1, f"batched and single renders differ by up to {worst} levels"
    # The same seed starts from the same noise for every η; different seeds differ.
    assert not np.array_equal(pixels(batched[(0.5, 0)]), pixels(batched[(0.5, 1)]))


@pytest.mark.parametrize("preset", ["community", "fast"])
def test_two_identical_edits_are_bit_identical(family_editor, scene, quick_config, preset):
    config = quick_config(preset)
    first = family_editor.edit(scene, "a blue circle", config, etas=[0.5, 1.0], seeds=[0, 1])
    second = family_editor.edit(scene, "a blue circle", config, etas=[0.5, 1.0], seeds=[0, 1])
    assert first.losses == second.losses
    assert torch.equal(first.e_opt, second.e_opt)
    assert same_images(first.images, second.images)


@pytest.mark.parametrize("preset", ["community", "fast"])
def test_restore_between_edits(family_editor, quick_config, preset):
    config = quick_config(preset)
    base = unet_state(family_editor)
    scene_a, scene_b = draw_scene((200, 30, 30)), draw_scene((30, 200, 30), background=(0, 0, 0))
    a1 = family_editor.edit(scene_a, "a blue circle", config, etas=[0.8], seeds=[0])
    assert all(torch.equal(base[k], v) for k, v in family_editor.unet.state_dict().items())
    family_editor.edit(scene_b, "a red square", config, etas=[0.8], seeds=[0])
    a2 = family_editor.edit(scene_a, "a blue circle", config, etas=[0.8], seeds=[0])
    assert same_images(a1.images, a2.images)
    assert family_editor.unet.state_dict().keys() == base.keys()


@pytest.mark.parametrize("preset", ["community", "fast"])
def test_save_load_render_equals_the_original(family_editor, scene, quick_config, tmp_path, preset):
    config = quick_config(preset)
    original = family_editor.edit(scene, "a blue circle", config, etas=[0.6, 1.0], seeds=[0, 3])
    original.save(tmp_path)
    loaded = EditResult.load(tmp_path)
    assert same_images(family_editor.render_result(loaded, [0.6, 1.0], [0, 3]), original.images)
    # A subset (different batching) matches within a level; a new η is simply rendered.
    again = family_editor.render_result(loaded, [1.0, 1.1], [3])
    assert np.abs(pixels(again[(1.0, 3)]) - pixels(original.images[(1.0, 3)])).max() <= 1
    assert (1.1, 3) in again


def test_render_without_a_saved_full_delta_is_a_clear_error(editor, scene, quick_config):
    result = editor.edit(scene, "a blue circle", quick_config(save_full_delta=False), etas=[1.0])
    assert result.delta is None
    with pytest.raises(ValueError, match="save_full_delta"):
        editor.render_result(result, [1.0], [0])


def test_failed_edit_still_restores_the_weights(family_editor, scene, quick_config):
    base = unet_state(family_editor)

    def explode(stage, step, total, loss):
        if stage == "finetune" and step == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        family_editor.edit(scene, "a blue circle", quick_config("fast", loss_readback_steps=1), etas=[1.0],
                           callback=explode)
    assert family_editor.unet.state_dict().keys() == base.keys()
    assert all(torch.equal(base[k], v) for k, v in family_editor.unet.state_dict().items())


def test_v_prediction_target_is_the_velocity():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0  # Salimans & Ho 2022
    target = training_target(scheduler, x0, noise, t)
    assert torch.allclose(target, expected, atol=1e-6)
    assert torch.equal(target, scheduler.get_velocity(x0, noise, t))
    epsilon = DDPMScheduler.from_config(scheduler.config, prediction_type="epsilon")
    assert torch.equal(training_target(epsilon, x0, noise, t), noise)


def test_edit_on_a_v_prediction_model(tmp_path, scene, quick_config):
    build_tiny_pipeline(prediction_type="v_prediction").save_pretrained(tmp_path, safe_serialization=True)
    editor = Editor(load_pipeline(str(tmp_path)))
    assert editor.noise_scheduler.config.prediction_type == "v_prediction"
    result = editor.edit(scene, "a blue circle", quick_config(), etas=[1.0])
    assert len(result.losses["finetune"]) == 6 and result.images[(1.0, 0)].size == scene.size


@pytest.mark.parametrize("option", [{"mixed_precision": "bf16"}, {"mixed_precision": "fp16"}, {"use_8bit_adam": True}])
def test_cuda_only_options_on_cpu_are_an_error(editor, scene, quick_config, option):
    with pytest.raises(ValueError, match="need a CUDA device"):
        editor.edit(scene, "a blue circle", quick_config(**option), etas=[1.0])


def test_gradient_checkpointing_gives_the_same_edit(editor, scene, quick_config):
    plain = editor.edit(scene, "a blue circle", quick_config(), etas=[1.0])
    checkpointed = editor.edit(scene, "a blue circle", quick_config(gradient_checkpointing=True), etas=[1.0])
    assert np.allclose(plain.losses["finetune"], checkpointed.losses["finetune"], rtol=1e-4)
    assert not editor.unet.is_gradient_checkpointing


def test_text_longer_than_the_model_takes_is_an_error(editor):
    with pytest.raises(ValueError, match="at most 32"):
        editor.encode_text("a very long description " * 10)


def test_result_reports_timings_memory_and_losses(editor, scene, quick_config):
    result = editor.edit(scene, "a blue circle", quick_config(), etas=[0.5, 1.0], seeds=[0])
    assert set(result.seconds) == {"encode", "embedding", "finetune", "render", "score"}
    assert all(s > 0 for s in result.seconds.values())
    assert all(b > 10_000_000 for b in result.peak_memory_bytes.values())
    assert result.input_transform["size"] == [editor.resolution, editor.resolution]


def test_sdxl_optimises_the_pooled_embedding_with_the_sequence(xl_editor, scene, quick_config):
    """The pooled embedding rides as the last row of the embedding: stage 1 moves it, its padding stays 0."""
    e_tgt = xl_editor.encode_text("a blue circle")
    pooled_dim = 32  # tiny-xl's second encoder (imagic/tiny.py)
    result = xl_editor.edit(scene, "a blue circle", quick_config("fast", embedding_steps=4), etas=[1.0])
    assert result.e_opt.shape == e_tgt.shape == (1, 33, 48)
    assert not torch.equal(result.e_opt[0, -1, :pooled_dim], e_tgt[0, -1, :pooled_dim].cpu())
    assert torch.count_nonzero(result.e_opt[0, -1, pooled_dim:]) == 0
    inputs = xl_editor.unet_inputs(torch.zeros(3, 4, 16, 16), e_tgt)
    assert inputs["encoder_hidden_states"].shape == (3, 32, 48)
    assert inputs["added_cond_kwargs"]["text_embeds"].shape == (3, pooled_dim)
    assert inputs["added_cond_kwargs"]["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32]
    assert torch.count_nonzero(xl_editor.encode_text("")) == 0  # SDXL's negative branch: zeros


def test_a_half_added_lora_is_stripped_by_recover(editor, scene, quick_config, monkeypatch):
    """peft can fail after wrapping some modules; the next edit must find the model as it was loaded."""
    from peft import LoraConfig, inject_adapter_in_model

    base = unet_state(editor)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), editor.unet)  # wrapped, no peft_config
    assert any("lora_" in k for k in editor.unet.state_dict())
    editor.recover()
    assert editor.unet.state_dict().keys() == base.keys()
    assert all(torch.equal(base[k], v) for k, v in editor.unet.state_dict().items())
    assert editor.edit(scene, "a blue circle", quick_config("fast"), etas=[1.0]).images


def test_lora_targets_the_unet_lacks_are_an_error_before_anything_changes(editor, scene, quick_config):
    with pytest.raises(ValueError, match=r"lora_target_modules \['nope'\] name no module"):
        editor.edit(scene, "x", quick_config("fast", lora_target_modules=("to_q", "nope")), etas=[1.0])
    assert not any("lora_" in k for k in editor.unet.state_dict())


@pytest.mark.parametrize("fit, size, box", [("keep", (44, 24), (2, 0, 61, 32)), ("crop", (32, 32), (16, 0, 48, 32)),
                                            ("pad", (32, 32), (0, 8, 32, 24))])
def test_a_two_to_one_image_keeps_its_aspect(editor, quick_config, fit, size, box):
    """The tiny model's native area is 32²; sides are multiples of 4 (VAE ×2, one UNet downsampling)."""
    wide = draw_scene(size=32).resize((64, 32))
    result = editor.edit(wide, "a blue circle", quick_config("fast", fit=fit, output_size="model"), etas=[1.0],
                         seeds=[0, 1])
    assert result.input_image.size == size and {image.size for image in result.images.values()} == {size}
    assert result.input_transform == {"mode": fit, "original_size": [64, 32], "size": list(size), "box": list(box),
                                      "output_size": list(size)}
    assert result.selection is not None  # scored and selected like any other edit


@pytest.mark.parametrize("fit", ["keep", "crop", "pad"])
def test_outputs_come_back_at_the_inputs_size_and_aspect(editor, quick_config, fit):
    """A 2:1 input gives 2:1 outputs of its own size (the default), the same edit as at the model's size."""
    wide = draw_scene(size=32).resize((64, 32))
    config = quick_config("fast", fit=fit)
    result = editor.edit(wide, "a blue circle", config, etas=[1.0], seeds=[0])
    at_model = editor.edit(wide, "a blue circle", config.model_copy(update={"output_size": "model"}), etas=[1.0])
    assert config.output_size == "input" and result.input_image.size == (64, 32)
    assert {image.size for image in result.images.values()} == {(64, 32)}
    assert result.input_transform["output_size"] == [64, 32] and result.input_transform["original_size"] == [64, 32]
    assert result.scores == at_model.scores  # scored where they were tuned: at the model's size
    left, top, right, bottom = result.input_transform["box"]
    output, model_output = np.asarray(result.images[(1.0, 0)]), np.asarray(at_model.images[(1.0, 0)])
    if fit == "crop":  # the sides the model never saw are the input's own pixels
        assert np.array_equal(output[:, :left], np.asarray(wide)[:, :left]) and left == 16
    if fit == "pad":  # the white bars the model drew around the input are not in the output
        model_output = model_output[top:bottom, left:right]
    else:  # the region of the input the model saw
        output = output[top:bottom, left:right]
    shrunk = np.asarray(Image.fromarray(output).resize(model_output.shape[1::-1], Image.Resampling.LANCZOS))
    assert np.abs(shrunk.astype(int) - model_output).mean() < 8  # the same picture, scaled back


def test_losses_are_read_back_every_n_steps_and_kept_per_step(editor, scene, quick_config):
    calls = []
    config = quick_config("fast", embedding_steps=5, finetune_steps=4, loss_readback_steps=2)
    result = editor.edit(scene, "a blue circle", config, etas=[1.0],
                         callback=lambda stage, step, total, loss: calls.append((stage, step, loss)))
    assert [(stage, step) for stage, step, _ in calls] == [("embedding", 2), ("embedding", 4), ("embedding", 5),
                                                           ("finetune", 2), ("finetune", 4)]
    assert len(result.losses["embedding"]) == 5 and len(result.losses["finetune"]) == 4
    assert calls[1][2] == result.losses["embedding"][3]  # the value read is the step's own loss


def test_the_fast_path_leaves_cpu_numbers_as_they_were(editor, scene, quick_config):
    """`auto` precision, TF32, fused Adam and loss read-back change nothing on the CPU: same bits."""
    fast = quick_config("fast")
    slow = quick_config("fast", mixed_precision="no", tf32=False, fused_adam=False, loss_readback_steps=1)
    a = editor.edit(scene, "a blue circle", fast, etas=[1.0], seeds=[0])
    b = editor.edit(scene, "a blue circle", slow, etas=[1.0], seeds=[0])
    assert a.losses == b.losses and torch.equal(a.e_opt, b.e_opt) and same_images(a.images, b.images)


def test_the_memory_a_full_finetune_needs_is_explicit(editor, quick_config):
    """On CUDA a full fine-tune that cannot fit is refused before it starts (SDXL: LoRA, or 8-bit Adam); the
    hand count of each part is in test_precision.py."""
    full, lora = editor.memory_needs(quick_config("paper")), editor.memory_needs(quick_config("fast"))
    assert 0 < lora["unet training"] < full["unet training"]
    sdxl_unet_parameters = 2_567_463_684
    assert 45e9 < 20 * sdxl_unet_parameters < 55e9  # the weights-and-optimiser figure the docs give


def test_a_learned_variance_unet_is_trained_and_rendered_on_its_prediction_only(tiny_dir, tmp_path, scene,
                                                                                 quick_config):
    """DeepFloyd IF's UNets output ε and a variance (2× the channels): only ε enters the loss and DDIM."""
    import shutil

    from diffusers import UNet2DConditionModel

    shutil.copytree(tiny_dir, tmp_path / "m")
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    UNet2DConditionModel.from_config({**unet.config, "out_channels": 8}).save_pretrained(tmp_path / "m" / "unet")
    learned = Editor(load_pipeline(str(tmp_path / "m")))
    x = torch.zeros(2, 4, 16, 16)
    assert learned.unet(x, 10, encoder_hidden_states=learned.encode_text("x").expand(2, -1, -1)).sample.shape[1] == 8
    assert learned.predict(x, 10, learned.encode_text("x")).shape == x.shape
    base = unet_state(learned)
    result = learned.edit(scene, "a blue circle", quick_config("community"), etas=[1.0], seeds=[0])
    assert all(np.isfinite(result.losses["finetune"])) and result.images[(1.0, 0)].size == scene.size
    assert all(torch.equal(base[k], v) for k, v in learned.unet.state_dict().items())
