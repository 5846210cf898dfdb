"""Dataset prefix × templates → a manifest the batch accepts, with stable ids."""

import pytest

from imagic.batch.augment import augmentation_manifest, check_locations, dataset_images
from imagic.batch.manifest import parse_manifest
from imagic.io.storage import LocalStorage

from tests.conftest import draw_scene


def test_dataset_images_finds_images_only(tmp_path):
    (tmp_path / "sub").mkdir()
    draw_scene().save(tmp_path / "b.png")
    draw_scene().save(tmp_path / "sub" / "a.JPG", format="JPEG")
    (tmp_path / "notes.txt").write_text("x")
    assert dataset_images(LocalStorage(tmp_path)) == [str(tmp_path / "b.png"), str(tmp_path / "sub" / "a.JPG")]


def test_manifest_crosses_images_and_templates_with_stable_ids():
    text = augmentation_manifest(["s3://data/images/cat.png", "s3://data/images/dog.jpg"],
                                 ["a {name} in the snow", "a watercolor painting"], etas=[0.8, 1.0], preset="fast")
    entries = parse_manifest(text, "jsonl")
    assert [e.target_text for e in entries] == ["a cat in the snow", "a watercolor painting",
                                                "a dog in the snow", "a watercolor painting"]
    assert {e.etas for e in entries} == {(0.8, 1.0)} and {e.preset for e in entries} == {"fast"}
    assert len({e.id for e in entries}) == 4 and entries[0].id.startswith("cat-")
    again = parse_manifest(augmentation_manifest(["s3://data/images/cat.png"], ["a {name} in the snow"],
                                                 etas=[0.8, 1.0], preset="fast"), "jsonl")
    assert again[0].id == entries[0].id  # same work, same id: a scheduled re-run skips it


def test_nothing_to_augment_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        augmentation_manifest([], ["x"])
    with pytest.raises(ValueError, match="no target-text templates"):
        augmentation_manifest(["a.png"], [])


def test_outputs_inside_the_dataset_are_refused():
    with pytest.raises(ValueError, match="inside the dataset"):
        check_locations("s3://data/images", "s3://data/images/edits")
    check_locations("s3://data/images", "s3://d/images-edits")  # a sibling prefix is fine
