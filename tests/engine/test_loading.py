import json
import shutil

import pytest

from imagic import ModelError, load_pipeline
from imagic.toy.tiny import make_clip_tokenizer


def test_tiny_loads_by_name_through_from_pretrained():
    pipeline = load_pipeline("tiny")
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert pipeline.safety_checker is None
    assert pipeline.unet.dtype.is_floating_point and str(pipeline.unet.dtype) == "torch.float32"


def test_local_directory(tiny_dir):
    assert load_pipeline(str(tiny_dir)).unet.config.sample_size == 16


def test_missing_directory_and_index(tmp_path):
    with pytest.raises(ModelError, match="no model_index.json"):
        load_pipeline(str(tmp_path))


def test_incomplete_directory_lists_what_is_missing(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "unet")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").rename(broken / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match=r"missing folder unet/.*no \.safetensors weights in vae/ \(found"):
        load_pipeline(str(broken))


def test_unreadable_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{")
    with pytest.raises(ModelError, match="invalid JSON"):
        load_pipeline(str(tmp_path))


def test_index_without_a_component(tiny_dir, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_dir, broken)
    index = json.loads((broken / "model_index.json").read_text())
    del index["text_encoder"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="lists no text_encoder"):
        load_pipeline(str(broken))


def test_unreachable_hub_id_is_a_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load model 'someone/not-a-model'"):
        load_pipeline("someone/not-a-model")


def test_tokenizer_merges_listed_words_into_single_tokens():
    tokenizer = make_clip_tokenizer(("circle", "red"))
    ids = tokenizer("a red circle").input_ids
    assert len(ids) == 5  # <start> a red circle <end>
    assert len(tokenizer("a blue circle").input_ids) == 2 + 1 + 4 + 1  # 'blue' is spelled out


def test_a_pipeline_imagic_cannot_edit_with_is_a_model_error(tiny_dir, tmp_path):
    """An inpainting checkpoint (9-channel UNet) and a pipeline class that is not text-to-image SD."""
    from diffusers import UNet2DConditionModel

    inpainting = tmp_path / "inpainting"
    shutil.copytree(tiny_dir, inpainting)
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    config = {**unet.config, "in_channels": 9}
    UNet2DConditionModel.from_config(config).save_pretrained(inpainting / "unet", safe_serialization=True)
    with pytest.raises(ModelError, match=r"takes 9 input channels \(an inpainting UNet\?\), its VAE makes 4"):
        load_pipeline(str(inpainting))

    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    with pytest.raises(ModelError, match="is a StableDiffusionInpaintPipeline; imagic-batch edits with"):
        load_pipeline(str(other))


def test_the_pipeline_class_comes_from_the_checkpoint():
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    assert type(load_pipeline("tiny-xl")) is StableDiffusionXLPipeline
    assert type(load_pipeline("tiny")) is StableDiffusionPipeline


def test_scheduler_keys_the_checkpoint_lacks_get_sd_values(tmp_path):
    """A PNDM config without clip_sample once gave DDIM clip_sample=True: every step's x0 clipped."""
    from diffusers import DDIMScheduler, PNDMScheduler

    from imagic.engine.loading import scheduler_config

    (tmp_path / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "skip_prk_steps": True}))
    loaded = PNDMScheduler.from_pretrained(tmp_path)
    assert DDIMScheduler.from_config(loaded.config).config.clip_sample is True  # what diffusers alone gives
    ddim = DDIMScheduler.from_config(scheduler_config(loaded))
    assert (ddim.config.clip_sample, ddim.config.set_alpha_to_one, ddim.config.steps_offset) == (False, False, 1)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", "clip_sample": True,
                                                                 "steps_offset": 0}))
    explicit = DDIMScheduler.from_config(scheduler_config(DDIMScheduler.from_pretrained(tmp_path)))
    assert (explicit.config.clip_sample, explicit.config.steps_offset) == (True, 0)  # what a config says is kept


def test_a_hub_id_pinned_to_a_revision_loads_that_snapshot_and_says_so(tiny_dir, tmp_path, monkeypatch):
    """`org/name@revision`: the hub's own cache layout, offline; the loaded pipeline, its hash and the
    record's model_revision name the revision, and another revision is not silently the one cached."""
    import huggingface_hub.constants

    from imagic.engine.builtins import model_revision
    from imagic.engine.identity import model_sha256

    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, tmp_path / "models--acme--tiny" / "snapshots" / revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    pipeline = load_pipeline(f"acme/tiny@{revision}")
    assert pipeline.name_or_path == f"acme/tiny@{revision}" and model_revision(pipeline.name_or_path) == revision
    assert model_sha256(pipeline.name_or_path) == model_sha256(str(tiny_dir))  # the same files
    with pytest.raises(ModelError, match="cannot load model"):
        load_pipeline(f"acme/tiny@{'f' * 40}")
