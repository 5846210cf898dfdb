"""One UNet's weights across edits: what stage B trains and how every edit gives the base weights back."""

import pytest
import torch

from imagic.engine.weights import UNetWeights, lora_parameter_count


@pytest.fixture
def weights(editor):
    return UNetWeights(editor.unet)


def state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def test_lora_trains_adapters_only_and_leaves_nothing_behind(weights, quick_config):
    before = state(weights.unet)
    params = weights.trainable(quick_config("fast", lora_rank=2))
    assert weights.modified and weights.has_lora and params and all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        params[0].add_(1.0)
    delta = weights.trained_delta(quick_config("fast", lora_rank=2))
    assert delta and all("lora_" in name for name in delta)
    weights.restore()
    assert not weights.modified and not weights.has_lora
    assert all(torch.equal(before[k], v) for k, v in weights.unet.state_dict().items())


def test_a_full_delta_applied_again_is_the_trained_weights(weights, quick_config):
    config = quick_config("community")  # save_full_delta: the quick config keeps it
    before = state(weights.unet)
    params = weights.trainable(config)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    trained = state(weights.unet)
    delta = weights.trained_delta(config)
    weights.restore()
    assert all(torch.equal(before[k], v) for k, v in weights.unet.state_dict().items())
    weights.apply_delta(delta, config)
    assert all(torch.allclose(trained[k], v) for k, v in weights.unet.state_dict().items())
    weights.restore()
    with pytest.raises(ValueError, match="does not fit"):
        weights.apply_delta({"nope": torch.zeros(1)}, config)
    weights.recover()


def test_recover_strips_half_added_adapters(weights, quick_config, monkeypatch):
    before = state(weights.unet)
    weights.add_lora(quick_config("fast", lora_rank=2))
    weights.unet.peft_config = {}  # as if add_adapter failed before registering its config
    weights.recover()
    assert not any("lora" in name for name, _ in weights.unet.named_modules())
    assert weights.unet.state_dict().keys() == before.keys()


def test_the_lora_parameters_are_counted_as_peft_adds_them(weights, quick_config):
    from imagic.engine.config import LORA_ATTENTION, LORA_CONVOLUTION

    config = quick_config("fast", lora_rank=3, lora_target_modules=LORA_ATTENTION + LORA_CONVOLUTION)
    weights.add_lora(config)
    try:
        added = sum(p.numel() for name, p in weights.unet.named_parameters() if "lora_" in name)
    finally:
        weights.recover()
    assert added > 0 and lora_parameter_count(weights.unet, config) == added


def test_frozen_weights_cast_down_come_back_to_fp32_bit_for_bit(weights, quick_config):
    """Under mixed precision a LoRA edit keeps the base in the compute dtype and trains fp32 adapters; a later
    fp32 edit gets the loaded weights back exactly."""
    before = state(weights.unet)
    weights.set_frozen_dtype(torch.bfloat16)
    try:
        weights.trainable(quick_config("fast", lora_rank=2))
        dtypes = {(("lora_" in name), p.dtype) for name, p in weights.unet.named_parameters()}
    finally:
        weights.restore()
        weights.set_frozen_dtype(torch.float32)
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    after = state(weights.unet)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 for v in after.values())


@pytest.mark.parametrize("targets", ["attention", "attention+convolution"])
def test_guidance_from_the_base_model_in_one_call_equals_two_calls(editor, quick_config, targets):
    from imagic.engine.config import LORA_ATTENTION, LORA_CONVOLUTION

    modules = LORA_ATTENTION + (LORA_CONVOLUTION if "convolution" in targets else ())
    config = quick_config("fast", lora_rank=2, lora_target_modules=modules, unconditional_model="base",
                          guidance_scale=3.0)
    params = editor.weights.trainable(config)
    try:
        with torch.no_grad():
            for p in params:  # LoRA's B starts at 0: make the fine-tuned model differ from the base
                p.normal_(0.0, 0.2)
        x = torch.randn((3, editor.unet.config.in_channels, 8, 8), generator=torch.Generator().manual_seed(0))
        t = torch.tensor(500)
        width = editor.unet.config.cross_attention_dim
        cond, uncond = torch.randn((3, 77, width)), torch.randn((1, 77, width)).expand(3, -1, -1)
        with torch.no_grad():
            one_call = editor.guided_prediction(x, t, cond, uncond, config)
            finetuned, base = editor.predict(x, t, cond), editor.base_prediction(x, t, uncond, None)
            assert not torch.allclose(finetuned, editor.base_prediction(x, t, cond, None), atol=1e-3)  # LoRA acts
        torch.testing.assert_close(one_call, base + 3.0 * (finetuned - base), atol=1e-5, rtol=1e-4)
    finally:
        editor.weights.restore()
