"""Imagic on a cascade (imagic/cascade.py), on the tiny IF-shaped cascade built in code."""

import json

import pytest
import torch

from imagic import EditResult, Editor, ModelError, load_pipeline, make_config
from imagic.batch.run import run_entry
from imagic.engine.cascade import SR_PREFIX, sr_config
from imagic.batch.manifest import ManifestError, single_entry, validate_manifest
from imagic.io.storage import LocalStorage

from tests.conftest import draw_scene
from .test_editor import same_images

FEW = dict(embedding_steps=3, finetune_steps=3, num_inference_steps=3, sr_num_inference_steps=3)


def cascade_config(preset="fast", **overrides):
    return make_config(preset, "cascade", **{**FEW, **overrides})


def states(editor):
    return [{k: v.clone() for k, v in unet.state_dict().items()} for unet in (editor.unet, editor.super_resolution.unet)]


def same_states(a, b):
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_the_three_stages_train_the_base_at_e_opt_and_the_sr_model_at_e_tgt(cascade_editor, monkeypatch):
    """Stage 1 and the base's fine-tune see e_opt; the SR model is fine-tuned on the input at e_tgt (the paper's
    §3.3), on the full-size image, with the downsampled input as its condition."""
    seen = {"base": [], "sr": []}

    def spy(owner, name):
        original = getattr(owner, "denoising_loss")

        def recording(latents, embedding, noise, timesteps, config):
            seen[name].append((latents.shape, embedding.detach().clone()))
            return original(latents, embedding, noise, timesteps, config)
        monkeypatch.setattr(owner, "denoising_loss", recording)

    spy(cascade_editor, "base")
    spy(cascade_editor.super_resolution, "sr")
    config = cascade_config(finetune_steps=4, sr_finetune_steps=5)
    result = cascade_editor.edit(draw_scene(size=32), "a blue circle", config, etas=[1.0], seeds=[0])

    assert {k: len(v) for k, v in result.losses.items()} == {"embedding": 3, "finetune": 4, "finetune_sr": 5}
    finetune = seen["base"][config.embedding_steps:]
    assert len(finetune) == 4 and all(torch.equal(e, result.e_opt) for _, e in finetune)
    assert all(shape[-2:] == (16, 16) for shape, _ in seen["base"])  # the base sees the input at its 16 px
    assert len(seen["sr"]) == 5 and all(torch.equal(e, result.e_tgt) for _, e in seen["sr"])
    assert all(shape[-2:] == (32, 32) for shape, _ in seen["sr"])
    assert not torch.equal(result.e_tgt, result.e_opt)
    assert {image.size for image in result.images.values()} == {(32, 32)}
    base, sr = result.stages
    assert base["size"] == [16, 16] and base["finetuned_on"] == "e_opt"
    assert sr["size"] == [32, 32] and sr["finetuned_on"] == sr["rendered_at"] == "e_tgt"
    assert sr["noise_level"] == config.sr_noise_level and sr["steps"] == 5


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_both_models_are_fine_tuned_and_restored_exactly(cascade_editor, preset):
    """LoRA or full: the delta holds both models' weights (the SR model's under its prefix), both changed,
    and both UNets are back to their base weights bit for bit after the edit."""
    before = states(cascade_editor)
    config = cascade_config(preset, **({"save_full_delta": True, "sr_finetune_steps": 3} if preset == "paper" else {}))
    result = cascade_editor.edit(draw_scene(size=32), "a blue circle", config, etas=[0.5, 1.0], seeds=[0])
    assert same_states(before, states(cascade_editor))
    base = {k: v for k, v in result.delta.items() if not k.startswith(SR_PREFIX)}
    sr = {k: v for k, v in result.delta.items() if k.startswith(SR_PREFIX)}
    assert base and sr
    if preset == "fast":
        assert all("lora_" in k for k in result.delta)
        assert any("add_k_proj" in k for k in sr)  # IF's text enters through the added key/value projections
    else:
        assert set(base) == set(before[0]) - {k for k in before[0] if "running" in k}
        assert any(v.abs().max() > 0 for v in base.values()) and any(v.abs().max() > 0 for v in sr.values())


def test_a_saved_cascade_edit_re_renders_identically_without_retraining(cascade_editor, tmp_path):
    config = cascade_config("anchored")
    result = cascade_editor.edit(draw_scene(size=32), "a blue circle", config, etas=[0.5, 1.0, 1.5], seeds=[0, 3])
    result.save(tmp_path)
    before = states(cascade_editor)
    loaded = EditResult.load(tmp_path)
    assert loaded.stages == result.stages
    again = cascade_editor.render_result(loaded, [0.5, 1.0, 1.5], [0, 3])
    assert same_images({k: result.images[k] for k in again}, again)
    assert same_states(before, states(cascade_editor))


def test_the_noise_augmentation_level_reaches_the_sr_model(cascade_editor):
    """The SR model's low-res input is noised at sr_noise_level (recorded): another level, another image."""
    images = [cascade_editor.edit(draw_scene(size=32), "a blue circle", cascade_config(sr_noise_level=level),
                                  etas=[1.0], seeds=[0]).images[(1.0, 0)] for level in (0, 250, 250)]
    assert same_images({0: images[1]}, {0: images[2]})
    assert not same_images({0: images[0]}, {0: images[1]})


def test_a_failed_cascade_edit_leaves_both_models_as_loaded(cascade_editor, monkeypatch):
    before = states(cascade_editor)

    def broken(*args, **kwargs):
        raise RuntimeError("SR kernel failed")

    monkeypatch.setattr(cascade_editor.super_resolution, "upsample", broken)
    with pytest.raises(RuntimeError):
        cascade_editor.edit(draw_scene(size=32), "a blue circle", cascade_config(), etas=[1.0], seeds=[0])
    cascade_editor.recover()
    assert same_states(before, states(cascade_editor))
    assert not any("lora" in name for name, _ in cascade_editor.super_resolution.unet.named_modules())


def test_a_batch_entry_on_a_cascade_gets_a_record_like_any_other(cascade_editor, tmp_path):
    image = tmp_path / "red circle.png"
    draw_scene(size=48).save(image)
    entry = single_entry(str(image), "a blue circle", etas=[0.5, 1.0], preset="fast", overrides=FEW, model="tiny-if")
    assert entry.config.embedding_steps == 3 and entry.config.lora_target_modules == make_config(
        "fast", "cascade").lora_target_modules
    record = run_entry(cascade_editor, entry, LocalStorage(tmp_path / "out"), model="tiny-if")
    assert record["status"] == "succeeded", record.get("error")
    saved = json.loads((tmp_path / "out" / entry.folder / "record.json").read_text())
    assert saved["model"] == "tiny-if" and len(saved["model_sha256"]) == 64
    assert [s["name"] for s in saved["stages"]] == ["base", "super_resolution"]
    assert set(saved["losses"]) == {"embedding", "finetune", "finetune_sr"}
    assert saved["selection"]["verdict"] in ("selected", "needs_review", "rejected")
    assert all({"edit", "fidelity"} <= set(image) for image in saved["outputs"]["images"])
    assert (tmp_path / "out" / entry.folder / "artifacts" / "delta.safetensors").is_file()


def test_the_cascade_has_its_own_presets_chosen_by_the_model():
    cascade = "\n".join(json.dumps({"image": f"{i}.png", "target_text": "a dog", "preset": "paper"}) for i in range(2))
    entries, rejected, _ = validate_manifest(cascade, "jsonl", model="tiny-if")
    assert not rejected and entries[0].config.embedding_steps == 100 and entries[0].config.sr_finetune_steps == 1500
    latent, _, _ = validate_manifest(cascade, "jsonl", model="tiny")
    assert latent[0].config.embedding_steps == 1000 and latent[0].config.sr_finetune_steps is None
    with pytest.raises(ManifestError, match="unknown preset 'community' for a cascade"):
        single_entry("a.png", "a dog", preset="community", model="A/IF-I+B/IF-II")


def test_options_a_model_cannot_honour_are_refused_before_anything_runs(cascade_editor, editor):
    with pytest.raises(ValueError, match="sr_noise_level set, but this model has no super-resolution stage"):
        editor.check_inputs(make_config("fast", sr_noise_level=100), [1.0], [0])
    with pytest.raises(ValueError, match="attention_injection needs separate self-attention layers"):
        cascade_editor.check_inputs(cascade_config(attention_injection=0.5), [1.0], [0])
    with pytest.raises(ValueError, match=r"lora_target_modules \['proj_in'\]"):
        cascade_editor.check_inputs(cascade_config(lora_target_modules=("to_q", "proj_in")), [1.0], [0])


def test_the_memory_a_cascade_needs_is_the_peak_of_its_two_fine_tunes(cascade_editor):
    lora, full = cascade_editor.memory_needs(cascade_config("fast")), cascade_editor.memory_needs(cascade_config("paper"))
    base = sum(p.numel() for p in cascade_editor.unet.parameters())
    sr = sum(p.numel() for p in cascade_editor.super_resolution.unet.parameters())
    assert lora["unet weights"] == 4 * base and lora["super-resolution unet weights"] == 4 * sr
    assert sum(lora.values()) < sum(full.values())
    # Full: either the base trains (20 B/parameter, its draws and activations) beside the SR weights, or the SR
    # model trains beside the base weights and their snapshot; the larger phase is the need.
    base_needs = cascade_editor.unet_memory_needs(cascade_config("paper"), cascade_editor.encode_text(""))
    sr_needs = cascade_editor.super_resolution.unet_memory_needs(sr_config(cascade_config("paper")),
                                                                 cascade_editor.encode_text(""))
    assert base_needs["unet weights"] + base_needs["unet training"] == 20 * base
    assert sr_needs["unet weights"] + sr_needs["unet training"] == 20 * sr
    assert sum(full.values()) - full["frozen models"] == max(sum(base_needs.values()) + 4 * sr,
                                                             8 * base + sum(sr_needs.values()))


def test_a_cascade_is_loaded_from_its_two_checkpoints_and_only_in_that_order(cascade_editor):
    base, sr = cascade_editor.pipeline.name_or_path.split("+")
    with pytest.raises(ModelError, match="super-resolution stage .*name its base first"):
        load_pipeline(sr)
    with pytest.raises(ModelError, match="the base of a cascade must be an IFPipeline"):
        load_pipeline(f"tiny+{sr}")
    with pytest.raises(ModelError, match="a cascade is two models"):
        load_pipeline(f"{base}+{sr}+{sr}")
    assert cascade_editor.super_resolution.text_encoder is None  # the base's T5 serves both


def test_an_if_base_alone_edits_in_pixel_space_with_the_single_model_recipe(cascade_editor):
    base = Editor.from_pretrained(cascade_editor.pipeline.name_or_path.split("+")[0])
    assert type(base) is Editor and base.vae is None and base.resolution == 16
    result = base.edit(draw_scene(size=32), "a blue circle", make_config("fast", **{k: v for k, v in FEW.items()
                                                                                   if not k.startswith("sr_")}),
                       etas=[1.0], seeds=[0])
    assert result.input_transform["size"] == [16, 16] and result.stages[0]["space"] == "pixel"
    assert result.images[(1.0, 0)].size == (32, 32)  # back at the input's size


def test_on_a_gpu_too_small_the_edit_is_refused_naming_each_part(cascade_editor, monkeypatch):
    """The check runs on CUDA only; here the device and its size are stood in for (and what would run on it:
    the empty text's embedding, computed here; the activation trace, counted in test_precision.py)."""
    from types import SimpleNamespace

    from imagic.engine.denoiser import Denoiser

    empty = cascade_editor.encode_text("")
    monkeypatch.setattr(cascade_editor, "encode_text", lambda text: empty)
    monkeypatch.setattr(Denoiser, "activation_bytes", lambda self, config, embedding: 0)
    monkeypatch.setattr(cascade_editor, "device", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**20))
    with pytest.raises(ValueError, match="super-resolution unet training .*set use_8bit_adam=true or finetune_method=lora"):
        cascade_editor.check_inputs(cascade_config("paper"), [1.0], [0])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**40))
    cascade_editor.check_inputs(cascade_config("paper"), [1.0], [0])  # 1 TiB: fits
