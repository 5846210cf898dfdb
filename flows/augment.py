"""Scheduled augmentation: images under a dataset prefix × target-text templates → manifest → bulk_edit."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task

from flows.bulk_edit import bulk_edit, final_state
from flows.retry import STORAGE_RETRIES
from imagic.batch.augment import augmentation_manifest, check_locations, dataset_images
from imagic.batch.manifest import stage_manifest
from imagic.io.storage import open_storage


@task(**STORAGE_RETRIES)
def list_dataset(dataset_uri: str) -> list[str]:
    return dataset_images(open_storage(dataset_uri))


@task(**STORAGE_RETRIES)
def write_manifest(text: str, output_uri: str) -> str:
    """Kept next to the outputs (content-addressed), so every batch can be audited and re-run."""
    return stage_manifest(open_storage(output_uri), "augment.jsonl", text)


@flow(name="augment", log_prints=True)
def augment(
    dataset_uri: str,
    templates: list[str],
    output_uri: str,
    etas: list[float] | None = None,
    seeds: list[int] | None = None,
    preset: str | None = None,
    overrides: dict | None = None,
    model: str | None = None,
    mode: Literal["local", "deployment"] = "deployment",
    chunk_size: int = 8,
    max_in_flight: int = 4,
):
    """Edit every image under `dataset_uri` towards every template; images already done are skipped."""
    check_locations(dataset_uri, output_uri)
    images = list_dataset(dataset_uri)
    text = augmentation_manifest(images, templates, etas=etas, seeds=seeds, preset=preset, overrides=overrides)
    manifest_uri = write_manifest(text, output_uri)
    get_run_logger().info("%d images × %d templates → %s", len(images), len(templates), manifest_uri)
    report = bulk_edit(manifest_uri, output_uri, mode=mode, model=model, chunk_size=chunk_size,
                       max_in_flight=max_in_flight)
    return final_state(report)
