"""The report of the whole batch: every status, runs kept, links that resolve, and the outputs as a dataset
that pandas and `datasets` read in one line."""

import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from imagic.batch.run import run_entry
from imagic.batch.outputs import BATCHES, failure_record
from imagic.batch.manifest import parse_manifest
from imagic.batch.report import batch_report, write_report
from imagic.io.storage import LocalStorage

from tests.conftest import QUICK, draw_scene



@pytest.fixture(scope="module")
def finished(editor, tmp_path_factory):
    """A store with two finished entries (one of them on its second attempt) and the records of a run."""
    root = tmp_path_factory.mktemp("report")
    draw_scene().save(root / "a.png")
    draw_scene(color=(20, 160, 20)).save(root / "b.png")
    rows = [{"defaults": {"etas": [0.8, 1.2], "seeds": [0, 1], "overrides": QUICK}},
            {"id": "a", "image": str(root / "a.png"), "target_text": "a blue circle"},
            {"id": "b", "image": str(root / "b.png"), "target_text": "a red circle"}]
    a, b = parse_manifest("\n".join(json.dumps(r) for r in rows), "jsonl")
    store = LocalStorage(root / "out")
    first_a = run_entry(editor, a, store, model="tiny")
    record_b = run_entry(editor, b.model_copy(update={"attempt": 2}), store, model="tiny")
    failed = failure_record(entry_id="c", line=4, input_uri="missing.png", target_text="x",
                            reason="input_unreadable", message="missing.png: cannot read")
    records = [{**first_a, "status": "finished_before"}, record_b, failed,
               {**first_a, "entry_id": "d", "status": "changed", "changes": ["model"]}]
    return store, records


def test_the_report_lists_every_entry_with_what_a_user_needs(finished):
    store, records = finished
    report = batch_report("b1", records, seconds=2.0, run={"run_id": "r-1", "run_name": "run-1", "model": "tiny"})
    assert report["counts"] | {"selected": 0, "needs_review": 0} == {
        "total": 4, "succeeded": 1, "failed": 1, "skipped": 1, "changed": 1, "failed_before": 0, "in_progress": 0,
        "selected": 0, "needs_review": 0}
    assert report["counts"]["selected"] + report["counts"]["needs_review"] == 3  # every finished row has a verdict
    rows = {row["entry_id"]: row for row in report["entries"]}
    assert rows["b"]["folder"] == "b@v2" and rows["b"]["attempt"] == 2 and rows["b"]["target_text"] == "a red circle"
    assert rows["a"]["model"] == "tiny" and rows["a"]["input"].endswith("a.png") and rows["a"]["contact_sheet"]
    assert rows["c"]["reason"] == "input_unreadable" and rows["d"]["changes"] == ["model"]
    assert report["changed"] == [{"entry_id": "d", "changes": ["model"]}]
    assert report["run_id"] == "r-1" and report["created_at"]


def test_reports_of_earlier_runs_are_kept_and_links_resolve(finished):
    store, records = finished
    for run_name in ("run-1", "run-2"):
        write_report(store, batch_report("b1", records, seconds=1.0, run={"run_name": run_name}),
                     records)
    runs = {key.split("/")[3] for key in store.list(f"{BATCHES}/b1/runs/")}
    assert runs == {"run-1", "run-2"}
    assert json.loads(store.read_bytes(f"{BATCHES}/b1/report.json"))["run_name"] == "run-2"
    for page in (f"{BATCHES}/b1/index.html", f"{BATCHES}/b1/runs/run-1/index.html"):
        html = store.read_bytes(page).decode()
        links = re.findall(r'src="([^"]+)"', html)
        assert links and all((store.root / Path(page).parent / link).resolve().is_file() for link in links)
        assert "b@v2/contact_sheet.png" in html and "input_unreadable" in html
    shared = store.read_bytes(f"{BATCHES}/b1/runs/run-2/index.shared.html").decode()
    links = re.findall(r'src="([^"]+)"', shared)
    assert links and all(Path(unquote(link.removeprefix("file://"))).is_file() for link in links)


def test_the_outputs_load_as_a_dataset_in_one_line(finished):
    store, records = finished
    write_report(store, batch_report("b1", records, seconds=1.0, run={"run_name": "run-3"}),
                 records)
    import pandas as pd

    table = pd.read_parquet(store.root / BATCHES / "b1" / "edits.parquet")
    # a: 2 η × 2 seeds, b: 4, c (failed): 1 row without image, d (changed): 4
    assert len(table) == 13 and set(table["status"]) == {"finished_before", "succeeded", "failed", "changed"}
    images = table.dropna(subset=["image_uri"])
    assert all(Path(uri).is_file() for uri in images["image_uri"])
    assert set(images.loc[images.entry_id == "b", "file_name"]) == {
        f"b@v2/eta-{e}_seed-{s}.png" for e in ("0.80", "1.20") for s in (0, 1)}
    assert images["edit"].notna().all() and images["selected"].sum() <= 3
    assert table.loc[table.entry_id == "c", "error_reason"].item() == "input_unreadable"

    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=str(store.root), split="train")
    # the outputs that answer the manifest now: a (finished before) and b; not d's (changed) nor c (failed)
    assert len(dataset) == 8 and {"image", "target_text", "eta", "seed", "selected"} <= set(dataset.features)
    assert dataset[0]["image"].size == (64, 64)  # the input's size


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_batches_sharing_an_output_root_never_lose_each_others_metadata(kind, tmp_path, request):
    """Batch B writes metadata.jsonl between batch A's read and A's write: A's compare-and-swap fails, A reads
    again and merges (it once overwrote B's lines)."""
    from imagic.batch.report import update_metadata
    from imagic.io.storage import open_storage

    store = open_storage(str(tmp_path) if kind == "local" else f"s3://{request.getfixturevalue('s3_env')}/shared")

    def rows(batch: str, n: int) -> list[dict]:
        return [{"file_name": f"{batch}-{i}/eta-1.00_seed-0.png", "entry_id": f"{batch}-{i}", "attempt": 1,
                 "input_uri": "a.png", "target_text": "t", "model": "toy", "eta": 1.0, "seed": 0, "edit": 0.1,
                 "fidelity": 0.9, "selected": False, "status": "succeeded"} for i in range(n)]

    update_metadata(store, rows("old", 1))
    read = store.read_versioned
    calls = []

    def read_then_let_b_write(key):
        seen = read(key)
        if not calls:  # A's first read: B's whole update lands before A writes
            calls.append(key)
            update_metadata(store, rows("b", 2))
        return seen

    store.read_versioned = read_then_let_b_write
    update_metadata(store, rows("a", 3))
    lines = [json.loads(line)["entry_id"] for line in store.read_bytes("metadata.jsonl").decode().splitlines()]
    assert sorted(lines) == ["a-0", "a-1", "a-2", "b-0", "b-1", "old-0"]
    assert "metadata.jsonl" in store.list() and not [k for k in store.list() if k.endswith(".lock")]


def test_a_big_batch_is_paged_and_streamed(finished, monkeypatch):
    """Records are read once for the report and once for the dataset, as iterators; the index is paged."""
    import imagic.batch.report as reporting

    store, records = finished
    monkeypatch.setattr(reporting, "PAGE_ROWS", 2)
    monkeypatch.setattr(reporting, "_PARQUET_BATCH", 3)  # several row groups
    many = [{**records[0], "entry_id": f"e{i}"} for i in range(5)]
    report = batch_report("big", iter(many), seconds=1.0, run={"run_name": "run-1"})
    write_report(store, report, iter(many))
    pages = sorted(k for k in store.list(f"{BATCHES}/big/") if "/runs/" not in k and k.endswith(".html"))
    assert pages == [f"{BATCHES}/big/index-2.html", f"{BATCHES}/big/index-3.html", f"{BATCHES}/big/index.html"]
    first = store.read_bytes(f"{BATCHES}/big/index.html").decode()
    assert first.count("<tr><td>") == 2 and 'href="index-3.html"' in first and ">e0<" in first and ">e2<" not in first
    assert json.loads(store.read_bytes(f"{BATCHES}/big/report.json"))["entries"] == report["entries"]
    import pandas as pd

    table = pd.read_parquet(store.root / BATCHES / "big" / "edits.parquet")
    assert len(table) == 5 * 4 and sorted(set(table["entry_id"])) == [f"e{i}" for i in range(5)]
    with pytest.raises(ValueError, match="out of the report's order"):
        write_report(store, report, reversed(many))


def test_cost_per_image_and_per_selected_image_from_device_seconds(finished):
    """Each entry's device time (its edit and its share of the worker's start and model load), priced."""
    store, records = finished
    priced = [{**records[0], "device_seconds": 30.0}, {**records[1], "device_seconds": 90.0}, records[2]]
    report = batch_report("cost", priced, seconds=1.0, run={"run_name": "run-1"}, price_per_gpu_hour=3.6)
    rows = {row["entry_id"]: row for row in report["entries"]}
    assert rows["a"]["cost"] == 0.03 and rows["b"]["cost"] == 0.09  # 3.6 an hour: 0.001 a second
    failed_seconds = rows["c"]["device_seconds"]
    cost = report["cost"]
    assert cost["device_seconds"] == round(120.0 + failed_seconds, 2) and cost["this_run_device_seconds"] < 120
    assert cost["total"] == round(cost["device_seconds"] * 0.001, 6)
    assert cost["per_image"] == round(cost["total"] / 8, 6)  # a and b: 2 η × 2 seeds each
    selected = report["counts"]["selected"]
    assert cost["per_selected_image"] == (round(cost["total"] / selected, 6) if selected else None)
    write_report(store, report, priced)
    import pandas as pd

    table = pd.read_parquet(store.root / BATCHES / "cost" / "edits.parquet")
    assert abs(table["cost"].sum() - cost["total"]) < 1e-4 and abs(table["device_seconds"].sum() - 120 - failed_seconds) < 0.1
    assert "0.0300" in store.read_bytes(f"{BATCHES}/cost/index.html").decode()

    unpriced = batch_report("cost", priced, seconds=1.0)
    assert "cost" not in unpriced["entries"][0] and unpriced["cost"]["price_per_gpu_hour"] is None
    assert "total" not in unpriced["cost"]
