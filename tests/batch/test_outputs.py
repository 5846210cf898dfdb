"""An entry's outputs: attempt folders and what one listing says of them, records, and the request they answer."""

import pytest
from PIL import Image

from imagic import EditResult, make_config
from imagic.batch.outputs import (SCHEMA_VERSION, Attempts, attempt_folder, batch_key, claim_key, edit_record,
                                  failure_record, parse_folder, request, request_changes, scan)
from imagic.engine.selection import Selection


def test_attempt_folders_round_trip_and_never_collide_with_an_id():
    assert attempt_folder("cat", 1) == "cat" and attempt_folder("cat", 3) == "cat@v3"
    assert parse_folder("cat@v3") == ("cat", 3) and parse_folder("cat") == ("cat", 1)
    assert parse_folder("cat@v1") == ("cat@v1", 1) and parse_folder("line-4@invalid") == ("line-4@invalid", 1)
    assert claim_key("cat@v2", 7) == "cat@v2/.claims/000007.json"
    assert batch_key("b1", "report.json") == "_batches/b1/report.json"
    assert batch_key("b1", "report.json", "r1") == "_batches/b1/runs/r1/report.json"


def test_one_listing_says_each_entrys_latest_attempt_and_its_state():
    found = scan(["a/record.json", "a/x.png", "a@v2/x.png", "b/error.json", "c/record.json", "c@v2/error.json",
                  "_batches/b1/report.json", "metadata.jsonl"])
    assert set(found) == {"a", "b", "c"}
    assert (found["a"].latest, found["a"].state) == (2, "started")  # a redo that never finished
    assert (found["b"].latest, found["b"].state) == (1, "failed")
    assert (found["c"].latest, found["c"].state, found["c"].finished) == (2, "failed", {1})
    assert Attempts().latest == 0


@pytest.fixture
def result():
    image = Image.new("RGB", (8, 8), "red")
    import torch

    return EditResult(target_text="a blue circle", config=make_config("fast"), input_image=image,
                      images={(1.0, 0): image, (1.2, 0): image}, e_tgt=torch.zeros(1, 2, 3), e_opt=torch.ones(1, 2, 3),
                      delta=None, seconds={"embedding": 1.0, "finetune": 2.0},
                      scores={(1.0, 0): {"edit": 0.1, "fidelity": 0.9}, (1.2, 0): {"edit": 0.7, "fidelity": 0.95}},
                      selection=Selection("selected", eta=1.2, seed=0))


def test_a_record_is_built_whole_with_every_location_and_no_secret(result):
    record = edit_record(result, entry_id="e1", attempt=2, manifest_line=3, folder="e1@v2",
                         input_uri="https://user:pw@host/a.png?X-Amz-Signature=s", input_bytes=b"abc", model="toy",
                         model_sha256="h", preset="fast", device="cpu", url_for=lambda name: f"s3://b/e1@v2/{name}",
                         wall_seconds=4.0, toy_metrics=[{"eta": 1.0}])
    assert record["schema_version"] == SCHEMA_VERSION and record["status"] == "succeeded"
    assert record["input"]["uri"] == "https://host/a.png?X-Amz-Signature=REDACTED" and "pw" not in str(record)
    assert [i["uri"] for i in record["outputs"]["images"]] == ["s3://b/e1@v2/eta-1.00_seed-0.png",
                                                               "s3://b/e1@v2/eta-1.20_seed-0.png"]
    assert record["outputs"]["contact_sheet"] == "s3://b/e1@v2/contact_sheet.png"
    assert record["selection"]["uri"] == "s3://b/e1@v2/selected.png" and record["selection"]["scores"]["edit"] == 0.7
    assert record["seconds"]["total"] == 3.0 and record["folder"] == "e1@v2" and record["toy_metrics"]
    assert "toy_metrics" not in edit_record(result, entry_id="e1", attempt=1, manifest_line=3, folder="e1",
                                            input_uri="a.png", input_bytes=b"", model="sd", model_sha256=None,
                                            preset="fast", device="cpu", url_for=str, wall_seconds=0.0)


def test_a_record_answers_its_request_and_names_what_changed(result):
    record = edit_record(result, entry_id="e1", attempt=1, manifest_line=1, folder="e1", input_uri="a.png",
                         input_bytes=b"abc", model="toy", model_sha256="h1", preset="fast", device="cpu",
                         url_for=str, wall_seconds=0.0)
    config = result.config.model_dump(mode="json")
    same = request(input_uri="a.png", target_text="a blue circle", model="toy", config=config, etas=[1.0, 1.2],
                   seeds=[0], input_sha256=record["input"]["sha256"], model_sha256=None)
    assert request_changes(record, same) == []
    other = {**same, "model_sha256": "h2", "etas": [1.0], "config": {**config, "seed": 5, "added_later": 1}}
    assert request_changes(record, other) == ["etas", "model_sha256", "config.seed"]


def test_an_error_record_has_a_reason_and_the_same_schema():
    record = failure_record(entry_id="e", line=2, input_uri="http://u:secret@h/x.png", target_text="t",
                            reason="input_unreadable", message="HTTP 404")
    assert record["status"] == "failed" and record["error"] == {"reason": "input_unreadable", "message": "HTTP 404"}
    assert record["schema_version"] == SCHEMA_VERSION and "secret" not in str(record)
