"""The flows under Prefect's test harness (a real temporary API server), local mode, tiny model."""

import json

import pytest

from .conftest import draw_scene

QUICK = {"embedding_steps": 2, "finetune_steps": 2, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def prefect():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_manifest(folder, tiny_dir):
    draw_scene().save(folder / "a.png")
    draw_scene((30, 200, 30)).save(folder / "b.png")
    (folder / "bad.png").write_text("no")
    rows = [{"defaults": {"etas": [1.0], "overrides": QUICK}},
            {"id": "a", "image": str(folder / "a.png"), "target_text": "a blue circle"},
            {"id": "b", "image": str(folder / "b.png"), "target_text": "a red circle"},
            {"id": "bad", "image": str(folder / "bad.png"), "target_text": "a red circle"},
            {"id": "bad-eta", "image": str(folder / "a.png"), "target_text": "a red circle", "etas": [5]}]
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bulk_edit_local_is_resumable(prefect, tmp_path, tiny_dir):
    from flows.bulk_edit import bulk_edit

    manifest = write_manifest(tmp_path, tiny_dir)
    out = tmp_path / "out"
    state = bulk_edit(str(manifest), str(out), model=str(tiny_dir), chunk_size=2, return_state=True)
    assert state.is_completed() and state.message == "2 succeeded, 2 failed, 0 skipped"
    report = json.loads(next(out.glob("_batches/*/report.json")).read_text())
    assert {f["entry_id"]: f["reason"] for f in report["failures"]} == {"bad": "input_not_an_image",
                                                                        "bad-eta": "invalid_entry"}
    assert "etas" in json.loads((out / "bad-eta" / "error.json").read_text())["error"]["message"]
    first = (out / "a" / "record.json").read_text()

    state = bulk_edit(str(manifest), str(out), model=str(tiny_dir), chunk_size=2, return_state=True)
    assert state.message == "0 succeeded, 2 failed, 2 skipped"  # only the bad entries are tried again
    assert (out / "a" / "record.json").read_text() == first


def test_invalid_manifest_fails_before_any_work(prefect, tmp_path):
    from flows.bulk_edit import bulk_edit
    from imagic.manifest import ManifestError

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "a.png", "target_text": "x", "etas": [7]}\n')
    with pytest.raises(ManifestError, match="line 1: etas"):
        bulk_edit(str(manifest), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
