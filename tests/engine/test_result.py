import torch
from PIL import Image

from imagic import EditResult, make_config
from imagic.engine.result import image_name


def test_image_name_carries_eta_and_seed():
    assert image_name(0.7, 0) == "eta-0.70_seed-0.png"
    assert image_name(1.0, 12) == "eta-1.00_seed-12.png"
    assert image_name(0.725, 1) != image_name(0.72, 1)  # never collide


def test_save_load_round_trip(tmp_path):
    images = {(0.5, 0): Image.new("RGB", (8, 8), "red"), (1.0, 3): Image.new("RGB", (8, 8), "blue")}
    result = EditResult(
        target_text="a blue square", config=make_config("fast", lora_rank=2),
        input_image=Image.new("RGB", (8, 8), "green"), images=images,
        e_tgt=torch.randn(1, 4, 8), e_opt=torch.randn(1, 4, 8), delta={"a.lora_A.weight": torch.randn(2, 3)},
        losses={"embedding": [1.0, 0.5], "finetune": [0.4]}, seconds={"render": 1.5},
    )
    written = result.save(tmp_path)
    assert (tmp_path / "eta-0.50_seed-0.png") in written and (tmp_path / "artifacts/delta.safetensors").exists()
    loaded = EditResult.load(tmp_path)
    assert loaded.config == result.config and loaded.target_text == result.target_text
    assert torch.equal(loaded.e_opt, result.e_opt) and torch.equal(loaded.e_tgt, result.e_tgt)
    assert torch.equal(loaded.delta["a.lora_A.weight"], result.delta["a.lora_A.weight"])
    assert loaded.losses == result.losses and loaded.etas == [0.5, 1.0] and loaded.seeds == [0, 3]
    assert loaded.images[(1.0, 3)].getpixel((0, 0)) == (0, 0, 255)


def test_load_of_a_non_edit_directory_is_clear(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="not a saved edit"):
        EditResult.load(tmp_path)
