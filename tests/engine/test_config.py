import pytest
from pydantic import ValidationError

from imagic.engine.config import IF_ATTENTION, PRESETS, EditConfig, make_config


def test_paper_preset_is_the_papers_recipe():
    config = make_config("paper")
    assert (config.embedding_steps, config.embedding_lr) == (1000, 2e-3)
    assert (config.finetune_steps, config.finetune_lr, config.finetune_method) == (1500, 5e-7, "full")


def test_community_and_fast_presets():
    community = make_config("community")
    assert (community.embedding_steps, community.embedding_lr, community.finetune_steps) == (500, 1e-3, 1000)
    assert community.finetune_lr == 2e-6
    fast = make_config("fast")
    assert fast.finetune_method == "lora"
    assert fast.embedding_steps + fast.finetune_steps < community.embedding_steps + community.finetune_steps


def test_every_field_overridable():
    config = make_config("paper", finetune_steps=3, guidance_scale=3.0, finetune_method="lora", lora_rank=2)
    assert (config.finetune_steps, config.guidance_scale, config.lora_rank) == (3, 3.0, 2)
    assert config.embedding_steps == PRESETS["paper"]["embedding_steps"]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"embedding_steps": -1}, "embedding_steps"),
        ({"finetune_lr": 0}, "finetune_lr"),
        ({"finetune_method": "dreambooth"}, "finetune_method"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"lora_alpha": 4.0, "finetune_method": "full"}, "lora_alpha"),
    ],
)
def test_bad_config_is_rejected_naming_the_field(overrides, field):
    with pytest.raises(ValidationError, match=field):
        make_config("community", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'slow'"):
        make_config("slow")


def test_config_round_trips_through_json():
    config = make_config("fast", lora_rank=4)
    assert EditConfig(**config.model_dump(mode="json")) == config


def test_a_built_in_model_brings_its_tuned_selection_and_any_other_model_the_relative_rule(monkeypatch):
    from imagic.engine import builtins

    toy = builtins.BUILTIN_MODELS["toy"]
    tuned = {"select_min_edit": 0.35, "select_min_fidelity": 0.8}
    monkeypatch.setitem(builtins.BUILTIN_MODELS, "toy", toy.__class__(**{**toy.__dict__, "selection": {"fast": tuned}}))
    fast = make_config("fast", model="toy")
    assert (fast.select_fidelity, fast.select_min_edit, fast.select_min_fidelity) == ("absolute", 0.35, 0.8)
    assert make_config("fast", model="toy", select_min_edit=0.5).select_min_edit == 0.5  # overrides win
    assert make_config("paper", model="toy").select_fidelity == "relative"  # no tuning for this preset
    checkpoint = make_config("fast", model="/models/sd15")
    assert checkpoint.select_fidelity == "relative" and checkpoint.select_min_edit == EditConfig().select_min_edit
    assert make_config("fast", model="base+super_resolution").lora_target_modules == IF_ATTENTION  # the cascade table
    assert make_config("fast").select_fidelity == "absolute"  # no model named: the preset's alone
