"""The per-entry unit on the tiny model, into a local store: good entries finish, bad ones get error records;
a re-run plans by request (done, changed, failed), and a redo never overwrites a finished attempt."""

import json
import os

import pytest
from PIL import Image

from imagic.batch.plan import chunk, plan
from imagic.batch.run import run_entry
from imagic.batch.plan import Redo
from imagic.batch.outputs import scan
from imagic.batch.manifest import parse_manifest
from imagic.engine.identity import model_sha256
from imagic.batch.report import batch_report, report_html
from imagic.batch.sheet import LABEL_HEIGHT, MIN_CELL, PAD
from imagic.io.storage import LocalStorage

from tests.conftest import QUICK, draw_scene



@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    draw_scene().save(folder / "good.png")
    (folder / "text.png").write_text("not an image")
    data = (folder / "good.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 3])
    return folder


def manifest(inputs, *names, etas=(0.8, 1.0), web=True, **overrides):
    rows = [{"defaults": {"etas": list(etas), "overrides": {**QUICK, **overrides}}}]
    rows += [{"id": name.split(".")[0], "image": str(inputs / name), "target_text": "a blue circle"} for name in names]
    if web:
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
    assert {e for e, a in scan(store.list()).items() if a.finished} == {"good"}

    planned = plan(entries, store, model="tiny")
    assert [e.id for e, _ in planned.done] == ["good"] and len(planned.todo) == 4  # failures are retried …
    assert all(e.attempt == 1 for e in planned.todo)  # … in the same folder: an error is not a finished output
    planned = plan(entries, store, model="tiny", redo=Redo.none)
    assert not planned.todo and sorted(e.id for e in planned.failed) == ["cut", "missing", "text", "web"]


def test_a_changed_request_is_reported_and_redone_only_when_asked(editor, inputs, tmp_path):
    store = LocalStorage(tmp_path / "out")
    [entry] = manifest(inputs, "good.png", web=False)
    first = run_entry(editor, entry, store, model="tiny")
    sha = model_sha256(editor.pipeline.name_or_path)
    assert [e.id for e, _ in plan([entry], store, model="tiny", model_hash=sha).done] == ["good"]

    def changes(entries, **kwargs):
        planned = plan(entries, store, **{"model": "tiny", "model_hash": sha, **kwargs})
        assert not planned.todo and not planned.done
        return [c for _, _, c in planned.changed]

    assert changes(manifest(inputs, "good.png", web=False, etas=(0.8, 1.2))) == [["etas"]]
    assert changes(manifest(inputs, "good.png", web=False, seed=7)) == [["config.seed"]]
    assert changes([entry], model="other-model") == [["model"]]
    assert changes([entry], model_hash="0" * 64) == [["model_sha256"]]
    draw_scene(color=(30, 30, 200)).save(inputs / "good.png")  # same URI, new content
    assert changes([entry]) == [["input_sha256"]]
    assert plan([entry], store, model="tiny", rehash_inputs=False).done  # not looked at when told not to

    # Redo: a new attempt folder; the finished one stays as it was.
    [redo] = plan([entry], store, model="tiny", redo=Redo.changed).todo
    assert (redo.attempt, redo.folder) == (2, "good@v2")
    second = run_entry(editor, redo, store, model="tiny")
    assert second["status"] == "succeeded" and second["attempt"] == 2
    assert json.loads(store.read_bytes("good/record.json"))["created_at"] == first["created_at"]
    assert store.exists("good/eta-0.80_seed-0.png") and store.exists("good@v2/eta-0.80_seed-0.png")
    assert [e.id for e, _ in plan([entry], store, model="tiny").done] == ["good"]  # the latest answers it
    [again] = plan([entry], store, model="tiny", redo=Redo.all).todo
    assert again.folder == "good@v3"


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
    report = batch_report("b2", [record], seconds=1.0)
    html = report_html(report, lambda key: key)
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


def test_every_output_of_an_entry_is_at_its_inputs_size(editor, tmp_path):
    """A 2:1 input: each η image, selected.png and the input beside them are 2:1 at its size; the record says
    the size the model worked at too."""
    draw_scene().resize((96, 48)).save(tmp_path / "wide.png")
    rows = [{"defaults": {"etas": [0.8, 1.0], "overrides": {**QUICK, "select_min_edit": -1.0, "select_min_fidelity": -1.0,
                                                            "select_min_reconstruction": -1.0}}},
            {"id": "wide", "image": str(tmp_path / "wide.png"), "target_text": "a blue circle"}]
    [entry] = parse_manifest("\n".join(json.dumps(r) for r in rows), "jsonl")
    store = LocalStorage(tmp_path / "out")
    record = run_entry(editor, entry, store, model="tiny")
    transform = record["input"]["transform"]
    assert transform["original_size"] == transform["output_size"] == [96, 48] and transform["size"] == [44, 24]
    for name in ("eta-0.80_seed-0.png", "eta-1.00_seed-0.png", "selected.png", "input.png"):
        assert Image.open(tmp_path / "out" / "wide" / name).size == (96, 48), name
    sheet = Image.open(tmp_path / "out" / "wide" / "contact_sheet.png")
    title, cells = LABEL_HEIGHT + PAD, PAD + MIN_CELL // 2 + LABEL_HEIGHT + PAD  # one row of 2:1 cells
    assert sheet.size == (PAD + 3 * (MIN_CELL + PAD), title + cells)


def test_an_entry_that_raises_fails_alone_and_the_next_runs(editor, inputs, tmp_path, monkeypatch):
    """A runtime error (a CUDA OOM, a kernel error) inside one edit: its error record, then the next entry."""
    import torch

    store = LocalStorage(tmp_path / "out")
    rows = [{"defaults": {"etas": [1.0], "overrides": QUICK}},
            {"id": "oom", "image": str(inputs / "good.png"), "target_text": "a blue circle"},
            {"id": "boom", "image": str(inputs / "good.png"), "target_text": "a green circle"},
            {"id": "fine", "image": str(inputs / "good.png"), "target_text": "a red circle"}]
    entries = parse_manifest("\n".join(json.dumps(r) for r in rows), "jsonl")
    original = editor.finetune
    faults = {"a blue circle": torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
              "a green circle": RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")}

    def finetune(latents, e_opt, config, generator, callback=None):
        delta = original(latents, e_opt, config, generator, callback)  # the model is changed, then it fails
        if current["text"] in faults:
            raise faults[current["text"]]
        return delta

    current = {}
    monkeypatch.setattr(editor, "finetune", finetune)
    records = {}
    for entry in entries:
        current["text"] = entry.target_text
        records[entry.id] = run_entry(editor, entry, store, model="tiny")
    assert records["oom"]["error"]["reason"] == "out_of_memory"
    assert "lower render_batch_size" in records["oom"]["error"]["message"]
    assert records["boom"]["error"] == {"reason": "engine_error",
                                        "message": "RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"}
    assert records["fine"]["status"] == "succeeded"
    assert not any("lora_" in key for key in editor.unet.state_dict())


def test_an_sdxl_entry_gets_a_record_like_any_other(xl_editor, inputs, tmp_path):
    store = LocalStorage(tmp_path / "out")
    [entry] = manifest(inputs, "good.png", web=False)
    record = run_entry(xl_editor, entry, store, model="tiny-xl")
    assert record["status"] == "succeeded" and record["selection"]["verdict"] in ("selected", "needs_review")
    assert record["input"]["transform"]["mode"] == "keep" and store.exists("good/record.json")


def test_the_input_policy_answers_alike_for_files_that_exist_and_do_not(editor, inputs, tmp_path):
    """A manifest from a shared bucket must not read worker-local files, nor learn which exist."""
    from imagic.batch.settings import Settings

    store = LocalStorage(tmp_path / "out")
    worker = Settings(allowed_inputs=["s3://"])
    rows = [{"defaults": {"etas": [1.0], "overrides": QUICK}},
            {"id": "exists", "image": str(inputs / "good.png"), "target_text": "x"},
            {"id": "missing", "image": str(inputs / "nope.png"), "target_text": "x"},
            {"id": "internal", "image": "http://169.254.169.254/latest/meta-data/x.png", "target_text": "x"}]
    entries = parse_manifest("\n".join(json.dumps(r) for r in rows), "jsonl")
    records = [run_entry(editor, e, store, model="tiny", settings=worker) for e in entries]
    assert {r["error"]["reason"] for r in records} == {"input_not_allowed"}
    messages = [r["error"]["message"].replace(r["input"]["uri"], "URI") for r in records]
    assert len(set(messages)) == 1 and "IMAGIC_ALLOWED_INPUTS" in messages[0]


def test_a_runaway_entry_is_stopped_at_its_time_limit_and_the_next_runs(editor, inputs, tmp_path):
    from imagic.batch.settings import Settings

    store = LocalStorage(tmp_path / "out")
    [entry] = manifest(inputs, "good.png", web=False)
    slow = run_entry(editor, entry, store, model="tiny", settings=Settings(entry_timeout_s=1e-6))
    assert slow["error"]["reason"] == "time_limit" and "IMAGIC_ENTRY_TIMEOUT_S" in slow["error"]["message"]
    assert not any("lora_" in key for key in editor.unet.state_dict())
    assert run_entry(editor, entry, store, model="tiny")["status"] == "succeeded"


def test_no_credentials_in_records(editor, inputs, tmp_path):
    store = LocalStorage(tmp_path / "out")
    rows = [{"defaults": {"etas": [1.0], "overrides": QUICK}},
            {"id": "basic", "image": "http://user:hunter2@127.0.0.1:9/x.png", "target_text": "x"},
            {"id": "signed", "image": "https://127.0.0.1:9/x.png?X-Amz-Credential=AKIAXXXX&X-Amz-Signature=f00d",
             "target_text": "x"}]
    for entry in parse_manifest("\n".join(json.dumps(r) for r in rows), "jsonl"):
        run_entry(editor, entry, store, model="tiny")
    written = b"".join(store.read_bytes(key) for key in store.list())
    assert b"hunter2" not in written and b"AKIAXXXX" not in written and b"f00d" not in written
    assert b"X-Amz-Signature=REDACTED" in written


def test_an_entry_another_run_holds_is_left_to_it_and_a_stale_claim_is_taken_over(editor, inputs, tmp_path):
    """Two runs of one batch at once once both edited every entry (and 8 record writes lost the race)."""
    import time

    from imagic.batch.claims import claim, live_claim
    from imagic.batch.run import read_records

    store = LocalStorage(tmp_path / "out")
    [entry] = manifest(inputs, "good.png", web=False)
    assert claim(store, "good", "run-a", lease_s=60)  # run A is editing it
    held = run_entry(editor, entry, store, model="tiny", holder="run-b")
    assert held["status"] == "in_progress" and held["holder"]["holder"] == "run-a"
    assert not store.exists("good/record.json") and not store.exists("good/error.json")
    [seen] = read_records([entry], store, holder="run-b")
    assert seen["status"] == "in_progress"  # run B's report says so; it is not a failure
    assert read_records([entry], store, holder="run-a")[0]["error"]["reason"] == "not_run"  # A's own lost worker

    assert claim(store, "good", "run-a", lease_s=-1)  # as if run A had crashed long ago: its lease expired …
    done = run_entry(editor, entry, store, model="tiny", holder="run-b")  # … is taken over
    assert done["status"] == "succeeded"
    assert live_claim(store, "good") is None  # released at once: a re-run never waits for the lease
    assert claim(store, "good", "run-d", lease_s=60) and time.time() < live_claim(store, "good")["expires_at"]


def test_the_report_counts_entries_in_progress_elsewhere(editor, inputs, tmp_path):
    from imagic.batch.claims import claim
    from imagic.batch.run import read_records

    store = LocalStorage(tmp_path / "out")
    [entry] = manifest(inputs, "good.png", web=False)
    claim(store, "good", "run-a", lease_s=60)
    report = batch_report("b", read_records([entry], store, holder="run-b"), seconds=1.0)
    assert report["counts"]["in_progress"] == 1 and report["counts"]["failed"] == 0
    assert report["entries"][0]["holder"] == "run-a" and "being edited by run run-a" in report_html(report, str)


def test_a_long_edit_renews_its_lease(editor, inputs, tmp_path, monkeypatch):
    """Leases are short (a run that dies without a word frees its entry within a minute) and renewed by a
    heartbeat while an entry is edited."""
    import imagic.batch.claims as claims_module

    store = LocalStorage(tmp_path / "out")
    [entry] = manifest(inputs, "good.png", web=False, finetune_steps=60)
    monkeypatch.setattr(claims_module, "RENEW_EVERY_S", 0.02)
    assert run_entry(editor, entry, store, model="tiny", holder="run-a")["status"] == "succeeded"
    claims = [json.loads(store.read_bytes(k)) for k in store.list("good/.claims/")]
    assert len(claims) > 3 and {c["holder"] for c in claims} == {"run-a"}  # first, renewals, release
    assert claims[-1]["expires_at"] == 0.0 and claims_module.LEASE_S < 60
    assert claims[0]["pid"] == os.getpid() and claims[0]["host"] and claims[0]["token"]


def test_an_entry_held_by_a_dead_process_of_this_host_is_taken_over_at_once(editor, inputs, tmp_path):
    import subprocess
    import sys

    from imagic.batch.claims import live_claim

    store = LocalStorage(tmp_path / "out")
    [entry] = manifest(inputs, "good.png", web=False)
    subprocess.run([sys.executable, "-c", "import sys; from imagic.batch.claims import claim; "
                    "from imagic.io.storage import LocalStorage; "
                    f"assert claim(LocalStorage({str(store.root)!r}), 'good', 'run-dead', lease_s=600)"], check=True)
    assert live_claim(store, "good") is None  # its lease runs ten more minutes, but its process has ended
    assert run_entry(editor, entry, store, model="tiny", holder="run-b")["status"] == "succeeded"


class LostResponses(LocalStorage):
    """A store whose create-if-absent writes are done but whose answers are lost: a retry finds the object."""

    def write_bytes(self, key, data, *, if_absent=False, if_version=None):
        written = super().write_bytes(key, data, if_absent=if_absent, if_version=if_version)
        if if_absent and written:
            super().write_bytes(key, data, if_absent=True)  # the retry: the object is there
            return False
        return written


def test_a_lost_response_never_makes_a_run_a_stranger_to_its_own_claim_or_record(editor, inputs, tmp_path):
    store = LostResponses(tmp_path / "out")
    [entry] = manifest(inputs, "good.png", web=False)
    record = run_entry(editor, entry, store, model="tiny", holder="run-a")
    assert record["status"] == "succeeded" and json.loads(store.read_bytes("good/record.json"))["status"] == "succeeded"


class FailingClaims(LocalStorage):
    def write_bytes(self, key, data, **kwargs):
        if "/.claims/" in key:
            from imagic.io.storage import StorageError

            raise StorageError(f"{key}: cannot write (InternalError)", transient=True)
        return super().write_bytes(key, data, **kwargs)


def test_a_claim_that_cannot_be_written_fails_that_entry_only(editor, inputs, tmp_path):
    store = FailingClaims(tmp_path / "out")
    [entry] = manifest(inputs, "good.png", web=False)
    record = run_entry(editor, entry, store, model="tiny", holder="run-a")
    assert record["status"] == "failed" and record["error"]["reason"] == "storage_error"
    assert "could not claim" in record["error"]["message"]


def test_an_entry_is_charged_its_share_of_the_worker_overhead(editor, inputs, tmp_path):
    store = LocalStorage(tmp_path / "out")
    [entry] = manifest(inputs, "good.png", web=False)
    record = run_entry(editor, entry, store, model="tiny", overhead_seconds=12.5)
    assert record["overhead_seconds"] == 12.5 and record["device_seconds"] == record["wall_seconds"] + 12.5
    assert json.loads(store.read_bytes("good/record.json"))["device_seconds"] == record["device_seconds"]


def test_a_run_that_takes_an_entry_discards_what_a_killed_writer_left_in_its_folder(editor, inputs, tmp_path):
    store = LocalStorage(tmp_path / "out")
    [entry] = manifest(inputs, "good.png", web=False)
    (tmp_path / "out" / "good").mkdir(parents=True)
    left = tmp_path / "out" / "good" / ".record.json.k1ll3d.partial"  # a kill -9 inside an atomic write
    left.write_bytes(b'{"half": ')
    assert run_entry(editor, entry, store, model="tiny", holder="run-b")["status"] == "succeeded"
    assert not left.exists() and not list((tmp_path / "out").rglob("*.partial"))
