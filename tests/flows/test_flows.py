"""The flows under Prefect's test harness (a real temporary API server), local mode, tiny model."""

import json
import subprocess
import sys
import threading
import time
from collections import Counter

import psutil
import pytest

from tests.conftest import QUICK, draw_scene



def write_manifest(folder, tiny_dir):
    draw_scene().save(folder / "a.png")
    draw_scene((30, 200, 30)).save(folder / "b.png")
    (folder / "bad.png").write_text("no")
    (folder / "cut.png").write_bytes((folder / "a.png").read_bytes()[:200])
    rows = [{"defaults": {"etas": [1.0], "overrides": QUICK}},
            {"id": "a", "image": str(folder / "a.png"), "target_text": "a blue circle"},
            {"id": "b", "image": str(folder / "b.png"), "target_text": "a red circle"},
            {"id": "bad", "image": str(folder / "bad.png"), "target_text": "a red circle"},
            {"id": "bad-eta", "image": str(folder / "a.png"), "target_text": "a red circle", "etas": [5]},
            {"id": "cut", "image": str(folder / "cut.png"), "target_text": "a red circle"},
            {"id": "gone", "image": str(folder / "gone.png"), "target_text": "a red circle"},
            {"id": "web", "image": "http://127.0.0.1:9/x.png", "target_text": "a red circle"}]
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bulk_edit_local_is_resumable(prefect, tmp_path, tiny_dir):
    from flows.bulk_edit import bulk_edit

    manifest = write_manifest(tmp_path, tiny_dir)
    out = tmp_path / "out"
    state = bulk_edit(str(manifest), str(out), model=str(tiny_dir), chunk_size=2, return_state=True)
    # 5 of 7 failed: above the default max_failure_fraction (0.5), so the run ends Failed for alerting.
    assert state.is_failed() and state.message.startswith("2 succeeded, 5 failed, 0 skipped: 5 of 7 entries failed")
    report = json.loads(next(out.glob("_batches/*/report.json")).read_text())
    assert {f["entry_id"]: f["reason"] for f in report["failures"]} == {
        "bad": "input_not_an_image", "bad-eta": "invalid_entry", "cut": "input_not_an_image",
        "gone": "input_unreadable", "web": "input_unreadable"}
    assert "etas" in json.loads((out / "bad-eta" / "error.json").read_text())["error"]["message"]
    first = (out / "a" / "record.json").read_text()

    state = bulk_edit(str(manifest), str(out), model=str(tiny_dir), chunk_size=2, return_state=True)
    assert state.message.startswith("0 succeeded, 5 failed, 2 skipped")  # only the bad entries are tried again
    assert (out / "a" / "record.json").read_text() == first
    # The re-run's report and index still show every entry: 2 finished before, 5 failed again.
    report = json.loads(next(out.glob("_batches/*/report.json")).read_text())
    assert Counter(r["status"] for r in report["entries"]) == {"finished_before": 2, "failed": 5}
    index = next(out.glob("_batches/*/index.html")).read_text()
    assert index.count("contact_sheet.png") == 2


def test_a_rerun_with_another_request_reports_changed_and_redoes_only_when_asked(prefect, tmp_path, tiny_dir):
    from flows.bulk_edit import bulk_edit

    draw_scene().save(tmp_path / "a.png")
    rows = [{"defaults": {"etas": [1.0], "overrides": QUICK}},
            {"id": "a", "image": str(tmp_path / "a.png"), "target_text": "a blue circle"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    assert bulk_edit(str(manifest), str(out), model=str(tiny_dir), return_state=True).message.startswith("1 succeeded")
    first = (out / "a" / "record.json").read_text()

    # Another config for the same id: not silently skipped, not redone, and said so.
    state = bulk_edit(str(manifest), str(out), model=str(tiny_dir), overrides={"seed": 3}, return_state=True)
    assert state.is_completed() and "1 changed (not redone: --redo changed)" in state.message
    report = json.loads(next(out.glob("_batches/*/report.json")).read_text())
    assert report["changed"] == [{"entry_id": "a", "changes": ["config.seed"]}]
    assert not (out / "a@v2").exists() and (out / "a" / "record.json").read_text() == first

    state = bulk_edit(str(manifest), str(out), model=str(tiny_dir), overrides={"seed": 3}, redo="changed",
                      return_state=True)
    assert state.message.startswith("1 succeeded")
    assert json.loads((out / "a@v2" / "record.json").read_text())["config"]["seed"] == 3
    assert (out / "a" / "record.json").read_text() == first  # the earlier attempt is kept as it was
    assert len(list(out.glob("_batches/*/runs/*/report.json"))) == 3  # every run's report is kept


def test_invalid_manifest_fails_before_any_work(prefect, tmp_path):
    from flows.bulk_edit import bulk_edit
    from imagic.batch.manifest import ManifestError

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "a.png", "target_text": "x", "etas": [7]}\n')
    with pytest.raises(ManifestError, match="line 1: etas"):
        bulk_edit(str(manifest), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_imagic_run_into_s3_then_status(prefect, tmp_path, tiny_dir, s3_env):
    """The CLI's `run` through the flow into S3 over HTTP (moto's server), then `status` on it."""
    import boto3
    from typer.testing import CliRunner

    from imagic.cli import app

    manifest = write_manifest(tmp_path, tiny_dir)
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(manifest), "--output", f"s3://{s3_env}/batch-1",
                                 "--model", str(tiny_dir), "--chunk-size", "3", "--max-failure-fraction", "0.75"])
    assert result.exit_code == 0, result.output
    assert "2 succeeded, 5 failed, 0 skipped" in " ".join(result.output.split())
    s3 = boto3.client("s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_env)["Contents"]}
    assert {"batch-1/a/record.json", "batch-1/b/contact_sheet.png", "batch-1/bad/error.json"} <= keys
    status = runner.invoke(app, ["status", f"s3://{s3_env}/batch-1"])
    assert status.exit_code == 0
    assert "2 finished, 5 failed" in " ".join(status.output.split())
    assert s3.head_object(Bucket=s3_env, Key="batch-1/a/record.json")["ContentType"] == "application/json"
    index = next(k for k in keys if k.endswith("/index.html"))
    assert s3.head_object(Bucket=s3_env, Key=index)["ContentType"] == "text/html"
    assert s3.head_object(Bucket=s3_env, Key="batch-1/a/contact_sheet.png")["ContentType"] == "image/png"
    # A missing bucket says so (not "storage key '.' must be a relative path").
    missing = runner.invoke(app, ["status", "s3://no-such-bucket/x"])
    assert missing.exit_code == 2 and "no bucket 'no-such-bucket'" in " ".join(missing.output.split())


def test_augment_edits_each_image_times_template_once(prefect, tmp_path, tiny_dir):
    from flows.augment import augment

    dataset = tmp_path / "images"
    dataset.mkdir()
    draw_scene().save(dataset / "red.png")
    draw_scene((30, 200, 30)).save(dataset / "green.png")
    args = dict(dataset_uri=str(dataset), templates=["a blue circle", "a {name} square"],
                output_uri=str(tmp_path / "out"), etas=[1.0], preset="community", overrides=QUICK,
                model=str(tiny_dir), mode="local")
    state = augment(**args, return_state=True)
    assert state.message == "4 succeeded, 0 failed, 0 skipped"
    assert len(list((tmp_path / "out").glob("*/record.json"))) == 4
    assert len(list((tmp_path / "out" / "_manifests").glob("augment-*.jsonl"))) == 1
    draw_scene((30, 30, 200)).save(dataset / "blue.png")  # the dataset grows: only the new image is edited
    assert augment(**args, return_state=True).message == "2 succeeded, 0 failed, 4 skipped"


def test_the_manifest_default_model_is_used_unless_the_run_names_one(prefect, tmp_path, tiny_dir):
    from flows.bulk_edit import bulk_edit

    draw_scene().save(tmp_path / "a.png")
    rows = [{"defaults": {"etas": [1.0], "overrides": QUICK, "model": str(tiny_dir)}},
            {"id": "a", "image": str(tmp_path / "a.png"), "target_text": "a blue circle"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert bulk_edit(str(manifest), str(tmp_path / "out"), return_state=True).message.startswith("1 succeeded")
    assert json.loads((tmp_path / "out" / "a" / "record.json").read_text())["model"] == str(tiny_dir)
    with pytest.raises(Exception, match="no-such-model"):  # the run's --model beats the manifest's
        bulk_edit(str(manifest), str(tmp_path / "out2"), model="/no-such-model")


def test_deployment_mode_without_the_chunk_deployment_says_how_to_register_it(prefect, tmp_path, tiny_dir):
    from flows.bulk_edit import bulk_edit

    manifest = write_manifest(tmp_path, tiny_dir)
    with pytest.raises(ValueError, match="prefect deploy --all"):
        bulk_edit(str(manifest), str(tmp_path / "out"), mode="deployment", model=str(tiny_dir))
    assert not list((tmp_path / "out").glob("*/record.json"))


@pytest.mark.parametrize("failed, threshold, ends", [(2, 0.5, "Completed"), (3, 0.5, "Failed"), (4, 1.0, "Completed"),
                                                     (1, 0.0, "Failed"), (0, 0.0, "Completed")])
def test_the_run_ends_failed_above_the_failure_fraction(failed, threshold, ends):
    from flows.bulk_edit import final_state

    report = {"counts": {"total": 4, "succeeded": 4 - failed, "failed": failed, "skipped": 0}}
    state = final_state(report, threshold)
    assert state.type.value.capitalize() == ends.upper().capitalize()
    assert state.message.startswith(f"{4 - failed} succeeded, {failed} failed, 0 skipped")
    if ends == "Failed":
        assert f"{failed} of 4 entries failed" in state.message and f"max_failure_fraction {threshold:g}" in state.message


def test_a_batch_on_a_cascade_takes_the_cascade_recipe_and_resumes(prefect, tmp_path):
    """The manifest names a cascade (the built-in tiny-if): its entries get the cascade's preset, records say
    what each stage did, and a re-run skips what is done, as for any model."""
    from flows.bulk_edit import bulk_edit

    draw_scene(size=32).save(tmp_path / "a.png")
    few = {**QUICK, "sr_finetune_steps": 2, "sr_num_inference_steps": 2}
    rows = [{"defaults": {"etas": [1.0], "overrides": few, "model": "tiny-if"}},
            {"id": "a", "image": str(tmp_path / "a.png"), "target_text": "a blue circle"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    assert bulk_edit(str(manifest), str(out), return_state=True).message.startswith("1 succeeded")
    record = json.loads((out / "a" / "record.json").read_text())
    assert record["model"] == "tiny-if" and "add_k_proj" in record["config"]["lora_target_modules"]
    assert [stage["finetuned_on"] for stage in record["stages"]] == ["e_opt", "e_tgt"]
    assert bulk_edit(str(manifest), str(out), return_state=True).message.startswith("0 succeeded, 0 failed, 1 skipped")


def test_a_manifest_from_a_bucket_reads_no_local_file_and_tells_none_apart(prefect, s3_env, tmp_path, tiny_dir):
    """A shared manifest's author may not name this machine's files (nor learn which exist)."""
    from flows.bulk_edit import bulk_edit
    from imagic.io.storage import open_storage

    draw_scene().save(tmp_path / "a.png")
    (tmp_path / "secret.txt").write_text("not for the bucket")
    bucket = open_storage(f"s3://{s3_env}")
    bucket.write_bytes("in/a.png", (tmp_path / "a.png").read_bytes())
    rows = [{"defaults": {"etas": [1.0], "overrides": QUICK}},
            {"id": "mine", "image": f"s3://{s3_env}/in/a.png", "target_text": "a blue circle"},
            {"id": "exists", "image": str(tmp_path / "secret.txt"), "target_text": "x"},
            {"id": "missing", "image": str(tmp_path / "nothing.png"), "target_text": "x"}]
    bucket.write_bytes("shared/manifest.jsonl", ("\n".join(json.dumps(r) for r in rows) + "\n").encode())
    out = tmp_path / "out"
    bulk_edit(f"s3://{s3_env}/shared/manifest.jsonl", str(out), model=str(tiny_dir), return_state=True)
    errors = {name: json.loads((out / name / "error.json").read_text())["error"] for name in ("exists", "missing")}
    assert {e["reason"] for e in errors.values()} == {"input_not_allowed"}
    assert errors["exists"]["message"].replace("secret.txt", "X") == errors["missing"]["message"].replace(
        "nothing.png", "X")  # the same answer whether the file exists or not
    assert (out / "mine" / "record.json").exists()


def test_a_rerun_waits_for_entries_a_live_run_holds_and_edits_what_that_run_leaves(prefect, tmp_path, tiny_dir,
                                                                                   monkeypatch):
    """Another run's live process holds `a`: without --wait-held the re-run ends Failed with `a` in progress;
    with it, the re-run waits, takes `a` once that process is gone, and ends Completed with every entry done."""
    import flows.bulk_edit
    from flows.bulk_edit import bulk_edit
    from imagic.batch.claims import HOST
    from imagic.batch.outputs import claim_key, json_bytes
    from imagic.io.storage import LocalStorage

    monkeypatch.setattr(flows.bulk_edit, "HELD_POLL_S", 0.5)
    draw_scene().save(tmp_path / "a.png")
    rows = [{"defaults": {"etas": [1.0], "overrides": QUICK}},
            {"id": "a", "image": str(tmp_path / "a.png"), "target_text": "a blue circle"},
            {"id": "b", "image": str(tmp_path / "a.png"), "target_text": "a red circle"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the other run's process
    try:
        holding = {"holder": "other-run", "host": HOST, "pid": other.pid, "started": psutil.Process(other.pid).create_time(),
                   "token": "t", "expires_at": time.time() + 600}
        LocalStorage(out).write_bytes(claim_key("a", 1), json_bytes(holding))
        state = bulk_edit(str(manifest), str(out), model=str(tiny_dir), return_state=True)
        assert state.is_failed() and "1 in progress in another run" in state.message, state.message
        assert not (out / "a" / "record.json").exists() and (out / "b" / "record.json").exists()

        threading.Timer(3.0, other.kill).start()  # the other run dies while this one waits
        state = bulk_edit(str(manifest), str(out), model=str(tiny_dir), wait_held_s=120, return_state=True)
    finally:
        other.kill()
        other.wait()
    assert state.is_completed() and state.message.startswith("1 succeeded, 0 failed, 1 skipped"), state.message
    assert json.loads((out / "a" / "record.json").read_text())["status"] == "succeeded"
