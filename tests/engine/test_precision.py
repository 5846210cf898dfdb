"""The CUDA fast path's dtypes and costs, checked on the CPU: CPU autocast runs the same bf16 code path."""

import pytest
import torch

from imagic.engine.weights import lora_parameter_count


@pytest.fixture
def bf16(editor, monkeypatch):
    """The editor computing as on a GPU (bf16 autocast), its weights back in fp32 after."""
    monkeypatch.setattr(editor, "precision", lambda config: "bf16")
    yield editor
    monkeypatch.undo()
    editor.prepare_weights(editor_config_fp32())


def editor_config_fp32():
    from imagic import make_config

    return make_config("anchored", mixed_precision="no")


def test_under_mixed_precision_every_unet_call_runs_in_autocast_and_only_lora_is_fp32(bf16, scene, quick_config,
                                                                                     monkeypatch):
    """Training, inversion, guidance and scoring all in bf16; frozen UNet and text encoder weights stored in
    bf16 (no cast per call), the trained LoRA weights fp32."""
    calls, dtypes = [], set()
    predict = bf16.predict

    def recording(x, t, embedding):
        calls.append(torch.is_autocast_enabled("cpu"))
        dtypes.update((("lora_" in n), p.dtype) for n, p in bf16.unet.named_parameters())
        return predict(x, t, embedding)

    monkeypatch.setattr(bf16, "predict", recording)
    result = bf16.edit(scene, "a blue circle", quick_config("anchored"), etas=[0.0, 1.0], seeds=[0])
    assert len(calls) > 20 and all(calls)
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    assert next(bf16.text_encoder.parameters()).dtype == torch.bfloat16
    assert result.scores and all(v["fidelity"] == v["fidelity"] for v in result.scores.values())


def test_a_fp32_edit_after_a_bf16_one_is_bit_identical_to_a_fresh_one(editor, bf16, scene, quick_config):
    config = quick_config("fast", mixed_precision="no")
    with pytest.MonkeyPatch.context() as patch:  # the editor as loaded: fp32
        patch.setattr(editor, "precision", lambda c: "no")
        fresh = editor.edit(scene, "a blue circle", config, etas=[1.0], seeds=[0])
        bf16.edit(scene, "a blue circle", quick_config("fast"), etas=[1.0], seeds=[0])  # still "no": fp32
    bf16.edit(scene, "a blue circle", quick_config("fast"), etas=[1.0], seeds=[0])  # bf16: weights cast down
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(editor, "precision", lambda c: "no")
        again = editor.edit(scene, "a blue circle", config, etas=[1.0], seeds=[0])
    assert again.losses == fresh.losses and torch.equal(again.e_opt, fresh.e_opt)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(again.images.values(), fresh.images.values()))


def test_memory_needs_are_a_hand_count_of_weights_training_draws_and_activations(editor, quick_config):
    n = sum(p.numel() for p in editor.unet.parameters())
    full, eight_bit = editor.memory_needs(quick_config("paper")), editor.memory_needs(quick_config("paper", use_8bit_adam=True))
    assert full["unet weights"] + full["unet training"] == 20 * n  # fp32 weights, gradients, snapshot, Adam
    assert eight_bit["unet weights"] + eight_bit["unet training"] == 14 * n
    lora = quick_config("fast")
    needs = editor.memory_needs(lora)
    assert needs["unet training"] == 16 * lora_parameter_count(editor.unet, lora)
    c, side = editor.unet.config.in_channels, editor.unet.config.sample_size
    steps = max(lora.embedding_steps, lora.finetune_steps)
    assert needs["training noise"] == steps * lora.train_batch_size * (c * side * side * 4 + 8)
    assert needs["frozen models"] == 4 * sum(p.numel() for m in (editor.vae, editor.text_encoder) for p in m.parameters())
    assert needs["activations"] == saved_for_backward(editor, lora)


def test_memory_needs_under_mixed_precision_count_the_compute_dtype(bf16, quick_config):
    n = sum(p.numel() for p in bf16.unet.parameters())
    lora, full = quick_config("fast"), quick_config("paper")
    assert bf16.memory_needs(lora)["unet weights"] == 2 * n  # frozen in bf16
    assert bf16.memory_needs(lora)["unet training"] == 18 * lora_parameter_count(bf16.unet, lora)  # + bf16 cast
    assert bf16.memory_needs(full)["unet weights"] + bf16.memory_needs(full)["unet training"] == 22 * n


def saved_for_backward(editor, config) -> int:
    """What a real training step saves for its backward pass, counted on real tensors."""
    params, saved = {id(p) for p in editor.unet.parameters()}, {}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in params:
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    side = editor.unet.config.sample_size
    latents = torch.randn(1, editor.unet.config.in_channels, side, side)
    noise = torch.randn(config.train_batch_size, *latents.shape[1:])
    timesteps = torch.randint(0, 1000, (config.train_batch_size,))
    editor.unet.requires_grad_(True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = editor.denoising_loss(latents, editor.encode_text(""), noise, timesteps, config)
        loss.backward()
    finally:
        editor.unet.requires_grad_(False)
        editor.unet.zero_grad(set_to_none=True)
    return sum(saved.values())


def test_sdxl_size_conditioning_is_built_once_per_size(xl_editor):
    embedding = xl_editor.encode_text("a photo")
    x = torch.zeros(2, 4, 8, 8)
    first = xl_editor.unet_inputs(x, embedding)["added_cond_kwargs"]["time_ids"]
    second = xl_editor.unet_inputs(x, embedding)["added_cond_kwargs"]["time_ids"]
    other = xl_editor.unet_inputs(torch.zeros(2, 4, 8, 16), embedding)["added_cond_kwargs"]["time_ids"]
    assert first.data_ptr() == second.data_ptr() and other.data_ptr() != first.data_ptr()
    assert other[0].tolist() == [8 * xl_editor.vae_scale_factor, 16 * xl_editor.vae_scale_factor, 0, 0,
                                 8 * xl_editor.vae_scale_factor, 16 * xl_editor.vae_scale_factor]


def test_if_prompts_are_lower_cased_and_stripped_as_ifpipeline_does(cascade_editor):
    assert torch.equal(cascade_editor.encode_text("  A Red CIRCLE "), cascade_editor.encode_text("a red circle"))


def test_a_768_px_sd2_checkpoint_that_does_not_say_v_prediction_is_refused():
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from imagic.engine.errors import ModelError
    from imagic.engine.loading import check_prediction_type

    unet = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=1024, sample_size=96))
    unsaid = SimpleNamespace(unet=unet, scheduler=DDIMScheduler.from_config({}))
    with pytest.raises(ModelError, match="v_prediction"):
        check_prediction_type(unsaid, "sd21")
    check_prediction_type(SimpleNamespace(unet=unet, scheduler=DDIMScheduler(prediction_type="v_prediction")), "sd21")
    base = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=1024, sample_size=64))
    check_prediction_type(SimpleNamespace(unet=base, scheduler=DDIMScheduler.from_config({})), "sd21-base")  # ε
