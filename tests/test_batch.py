"""The per-entry unit on the tiny model, into a local store: good entries finish, bad ones get error records."""

import json

import pytest

from imagic.batch import batch_report, chunk, finished_ids, plan, report_html, run_entry, write_report
from imagic.manifest import parse_manifest
from imagic.model_store import model_sha256
from imagic.storage import LocalStorage

from .conftest import draw_scene

QUICK = {"embedding_steps": 3, "finetune_steps": 3, "num_inference_steps": 3}


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    draw_scene().save(folder / "good.png")
    (folder / "text.png").write_text("not an image")
    data = (folder / "good.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 3])
    return folder


def manifest(inputs, *names):
    rows = [{"defaults": {"etas": [0.8, 1.0], "overrides": QUICK}}]
    rows += [{"id": name.split(".")[0], "image": str(inputs / name), "target_text": "a blue circle"} for name in names]
    rows.append({"id": "web", "image": "http://127.0.0.1:9/x.png", "target_text": "a blue circle"})
    return parse_manifest("\n".join(json.dumps(r) for r in rows), "jsonl")


def test_good_entries_finish_and_bad_ones_get_error_records(editor, inputs, tmp_path):
    store = LocalStorage(tmp_path / "out")
    entries = manifest(inputs, "good.png", "text.png", "cut.png", "missing.png")
    records = {e.id: run_entry(editor, e, store, model="tiny") for e in entries}
    assert records["good"]["status"] == "succeeded"
    assert records["good"]["model_sha256"] == model_sha256(editor.pipeline.name_or_path) is not None
    assert {"good/record.json", "good/contact_sheet.png", "good/eta-0.80_seed-0.png",
            "good/artifacts/embeddings.safetensors"} <= set(store.list())
    reasons = {k: r["error"]["reason"] for k, r in records.items() if r["status"] == "failed"}
    assert reasons == {"text": "input_not_an_image", "cut": "input_not_an_image", "missing": "input_unreadable",
                       "web": "input_unreadable"}
    for entry_id in reasons:
        assert not store.exists(f"{entry_id}/record.json")
        error = json.loads(store.read_bytes(f"{entry_id}/error.json"))
        assert error["error"]["message"] and error["manifest_line"] > 1
    assert finished_ids(store) == {"good"}

    todo, done = plan(entries, store)
    assert [e.id for e in done] == ["good"] and len(todo) == 4  # failed entries are retried on re-run

    report = batch_report("b1", list(records.values()), skipped=[], seconds=1.0)
    assert report["counts"] == {"total": 5, "succeeded": 1, "failed": 4, "skipped": 0,
                                "selected": int(records["good"]["selection"]["verdict"] == "selected"),
                                "needs_review": int(records["good"]["selection"]["verdict"] == "needs_review")}
    assert {f["reason"] for f in report["failures"]} == {"input_not_an_image", "input_unreadable"}
    write_report(store, report)
    assert "good/contact_sheet.png" in report_html(report)
    assert json.loads(store.read_bytes("_batches/b1/report.json"))["counts"]["failed"] == 4


def test_a_finished_record_is_never_overwritten(editor, inputs, tmp_path):
    store = LocalStorage(tmp_path / "out")
    [entry] = manifest(inputs, "good.png")[:1]
    first = run_entry(editor, entry, store, model="tiny")
    second = run_entry(editor, entry, store, model="tiny")
    assert (first["status"], second["status"]) == ("succeeded", "already_done")
    assert json.loads(store.read_bytes("good/record.json"))["created_at"] == first["created_at"]


def test_chunking():
    assert [len(c) for c in chunk(list(range(7)), 3)] == [3, 3, 1]


@pytest.mark.parametrize("accept", [True, False])
def test_record_sheet_and_index_carry_the_selection(editor, inputs, tmp_path, accept):
    """Thresholds that every output passes (or none does) make the verdict known in advance."""
    threshold = -1.0 if accept else 1.0
    rows = [{"defaults": {"etas": [0.8, 1.0], "overrides": {**QUICK, "select_min_edit": threshold,
                                                            "select_min_fidelity": threshold,
                                                            "select_min_reconstruction": -1.0}}},
            {"id": "good", "image": str(inputs / "good.png"), "target_text": "a blue circle"}]
    [entry] = parse_manifest("\n".join(json.dumps(r) for r in rows), "jsonl")
    store = LocalStorage(tmp_path / "out")
    record = run_entry(editor, entry, store, model="tiny")
    assert all({"edit", "fidelity"} <= set(item) for item in record["outputs"]["images"])
    assert 0.0 not in [item["eta"] for item in record["outputs"]["images"]]  # the η=0 check is not an output
    assert isinstance(record["reconstruction_fidelity"], float)
    selection = record["selection"]
    report = batch_report("b2", [record], skipped=[], seconds=1.0)
    html = report_html(report)
    if accept:
        assert selection["verdict"] == "selected" and selection["eta"] in (0.8, 1.0)
        source = store.read_bytes(f"good/{selection['source_file']}")
        assert store.read_bytes("good/selected.png") == source
        assert report["counts"]["selected"] == 1 and report["entries"][0]["selected_eta"] == selection["eta"]
        assert "good/selected.png" in html
    else:
        assert selection["verdict"] == "needs_review" and "edits enough" in selection["reason"]
        assert not store.exists("good/selected.png")
        assert report["needs_review"] == [{"entry_id": "good", "reason": selection["reason"]}]
        assert "needs review" in html
