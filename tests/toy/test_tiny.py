"""Tiny built-in models, built in code: saved once into the cache, complete, reused after."""

from imagic.engine.builtins import BUILTIN_MODELS
from imagic.toy.tiny import VERSION, ensure_tiny_model


def test_a_tiny_model_is_built_once_complete_and_reused(tmp_path):
    builtin = BUILTIN_MODELS["tiny"]
    directory = ensure_tiny_model(tmp_path / "tiny", builtin)
    assert directory.name == f"tiny-v{VERSION}" and (directory / "model_index.json").is_file()
    assert list((directory / "unet").glob("*.safetensors"))
    stamp = (directory / "unet" / "config.json").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path / "tiny", builtin) == directory
    assert (directory / "unet" / "config.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_tiny_cascade_is_two_pipelines_side_by_side(tmp_path):
    directory = ensure_tiny_model(tmp_path / "tiny-if", BUILTIN_MODELS["tiny-if"])
    assert all((directory / folder / "model_index.json").is_file() for folder in ("base", "super_resolution"))
    assert not (directory / "super_resolution" / "text_encoder").exists()  # the base's T5 serves both
