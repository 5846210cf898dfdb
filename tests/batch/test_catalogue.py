"""The store's catalogue: a re-run plans from one listing and the catalogue's shards, reading no record and
no input that has not changed — and a stale, damaged or missing catalogue costs reads, never a wrong plan."""

import json
import os

import pytest

import imagic.batch.plan as planning
from imagic.batch.catalogue import CATALOGUE, shard_key, update_catalogue
from imagic.batch.plan import Redo, plan
from imagic.batch.run import run_entry
from imagic.engine.identity import model_sha256
from imagic.io.storage import LocalStorage

from tests.batch.test_run import manifest
from tests.conftest import draw_scene


class Counting(LocalStorage):
    """A local store that counts the records it is asked for."""

    def __init__(self, root):
        super().__init__(root)
        self.record_reads = 0

    def read_bytes(self, key):
        self.record_reads += key.endswith("/record.json")
        return super().read_bytes(key)


@pytest.fixture
def finished(editor, tmp_path):
    """Two finished entries of the tiny model, planned once (so their catalogue lines are written)."""
    folder = tmp_path / "in"
    folder.mkdir()
    draw_scene().save(folder / "a.png")
    draw_scene(color=(30, 200, 30)).save(folder / "b.png")
    store = Counting(tmp_path / "out")
    entries = manifest(folder, "a.png", "b.png", web=False)
    for entry in entries:
        assert run_entry(editor, entry, store, model="tiny")["status"] == "succeeded"
    sha = model_sha256(editor.pipeline.name_or_path)

    def plan_now(**kwargs):
        store.record_reads = 0
        planned = plan(entries, store, **{"model": "tiny", "model_hash": sha, **kwargs})
        update_catalogue(store, planned.catalogue)
        return planned

    first = plan_now()
    assert store.record_reads == 2 and len(first.catalogue) == 2  # no catalogue yet: every record read
    return store, entries, plan_now, folder


def test_a_rerun_reads_no_record_and_no_unchanged_input(finished, monkeypatch):
    store, entries, plan_now, _ = finished
    monkeypatch.setattr(planning, "read_uri", lambda *a, **k: pytest.fail("an unchanged input was read"))
    planned = plan_now()
    assert store.record_reads == 0 and not planned.catalogue
    assert [e.id for e, _ in planned.done] == ["a", "b"]
    summary = json.loads(planned.done[0][1])
    assert summary["entry_id"] == "a" and summary["outputs"]["images"] and summary["selection"]["verdict"]
    assert {k for k in store.list() if k.startswith(f"{CATALOGUE}/")} == {shard_key("a"), shard_key("b")}


def test_what_the_catalogue_cannot_vouch_for_is_read_again(finished, editor):
    store, entries, plan_now, inputs = finished
    draw_scene(color=(30, 30, 200), size=72).save(inputs / "b.png")  # same URI, new content
    planned = plan_now()
    assert store.record_reads == 1 and [c for _, _, c in planned.changed] == [["input_sha256"]]
    assert [e.id for e, _ in planned.done] == ["a"]

    record = store.root / "a" / "record.json"  # the record replaced by hand: the line no longer vouches for it
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "etas": [0.8]}))
    planned = plan_now()
    assert [(e.id, c) for e, _, c in planned.changed] == [("a", ["etas"]), ("b", ["input_sha256"])]

    assert [(e.id, c) for e, _, c in plan_now(model="other").changed] == [("a", ["model", "etas"]),
                                                                           ("b", ["model", "input_sha256"])]


def test_a_damaged_catalogue_or_record_costs_reads_not_a_wrong_plan(finished):
    store, entries, plan_now, _ = finished
    for shard in (store.root / CATALOGUE).iterdir():
        shard.write_text('{"folder": "a", "record": \n[1, 2]\n' + shard.read_text()[:40])
    planned = plan_now()
    assert store.record_reads == 2 and [e.id for e, _ in planned.done] == ["a", "b"]
    assert store.record_reads == 2 and plan_now().done and store.record_reads == 0  # the shards healed

    (store.root / "b" / "record.json").write_text("{not json")
    planned = plan_now()
    assert [e.id for e, _ in planned.done] == ["a"]
    [(entry, summary, changes)] = planned.changed
    assert entry.id == "b" and changes == ["record (JSONDecodeError)"] and json.loads(summary)["folder"] == "b"
    [redo] = plan_now(redo=Redo.changed).todo
    assert redo.folder == "b@v2"  # an unreadable record is redone beside it, never overwritten


def test_an_input_not_allowed_is_not_read_to_compare(finished, monkeypatch):
    store, entries, plan_now, inputs = finished
    draw_scene(color=(30, 30, 200), size=72).save(inputs / "b.png")
    monkeypatch.setattr(planning, "read_uri", lambda *a, **k: pytest.fail("read an input it may not read"))
    planned = plan_now(input_allowed=lambda uri: False)
    assert [e.id for e, _ in planned.done] == ["a", "b"]  # not comparable: kept, as when asked not to compare


def test_concurrent_merges_keep_every_line(tmp_path):
    store = LocalStorage(tmp_path)
    line = lambda folder, n: json.dumps({"folder": folder, "record": str(n), "summary": {}}).encode()  # noqa: E731
    update_catalogue(store, [line("x", 1), line("y", 1)])
    update_catalogue(store, [line("x", 2)])
    lines = [json.loads(text) for key in store.list(CATALOGUE) for text in store.read_bytes(key).splitlines()]
    assert sorted((row["folder"], row["record"]) for row in lines) == [("x", "2"), ("y", "1")]
    assert all(os.path.basename(key) != ".lock" for key in store.list())
