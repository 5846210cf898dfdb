import json
import shutil

import pytest

from imagic import ModelError, load_pipeline
from imagic.tiny import make_clip_tokenizer


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
