"""A probe of hostile and careless input: one manifest mixing 40+ kinds of bad entries with good ones,
through `bulk_edit` (Prefect, local mode, tiny model) in ONE run. Every good entry is edited, every bad
one carries a clear reason, nothing leaks a credential, and the batch survives to write its report."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import QUICK, draw_scene, jsonl_manifest

SECRETS = ("hunter2", "AKIAPROBE", "deadbeefsig")


def build_inputs(folder):
    """Good images of awkward kinds, and files that are not images at all."""
    draw_scene().save(folder / "plain.png")
    draw_scene().convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.asarray(draw_scene().convert("L"), dtype=np.uint16) * 200).save(folder / "deep.png")
    frames = [draw_scene(c) for c in ((200, 30, 30), (30, 200, 30))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°
    draw_scene().resize((48, 32)).save(folder / "rotated.jpg", exif=exif)
    draw_scene().convert("RGBA").save(folder / "alpha.png")
    draw_scene().convert("P").save(folder / "palette.png")
    draw_scene().resize((64, 32)).save(folder / "wide.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    data = (folder / "plain.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    Image.new("1", (9000, 9000)).save(folder / "bomb.png")  # 81 MP in a few kB
    (folder / "adir.png").mkdir()
    os.mkfifo(folder / "pipe.png")


def test_one_run_survives_every_kind_of_bad_input(prefect, tmp_path, tiny_dir, hostile_http, s3_env):
    from flows.bulk_edit import bulk_edit

    build_inputs(tmp_path)
    image = lambda name: str(tmp_path / name)  # noqa: E731
    good = {f"good-{name.split('.')[0]}": image(name) for name in
            ("plain.png", "cmyk.jpg", "deep.png", "animated.gif", "rotated.jpg", "alpha.png", "palette.png",
             "wide.png")}
    lines = [{"defaults": {"etas": [1.0], "overrides": QUICK}}]
    lines += [{"id": eid, "image": uri, "target_text": "a blue circle"} for eid, uri in good.items()]
    bad_inputs = {  # id → (image, the reason its error record must give)
        "missing": (image("nope.png"), "input_unreadable"), "directory": (image("adir.png"), "input_unreadable"),
        "fifo": (image("pipe.png"), "input_unreadable"), "dev-zero": ("/dev/zero", "input_unreadable"),
        "empty": (image("empty.png"), "input_not_an_image"), "text": (image("text.png"), "input_not_an_image"),
        "truncated": (image("cut.png"), "input_not_an_image"), "garbage": (image("garbage.jpg"), "input_not_an_image"),
        "bomb": (image("bomb.png"), "input_not_an_image"), "http-404": (f"{hostile_http}/x.png", "input_unreadable"),
        "redirect": (f"{hostile_http}/away.png", "input_unreadable"), "closed-port": ("http://127.0.0.1:9/x.png", "input_unreadable"),
        "basic-auth": ("http://user:hunter2@127.0.0.1:9/x.png", "input_unreadable"),
        "presigned": (f"{hostile_http}/x.png?X-Amz-Credential=AKIAPROBE&X-Amz-Signature=deadbeefsig", "input_unreadable"),
        "no-bucket": ("s3://no-such-bucket-probe/x.png", "input_unreadable"),
    }
    lines += [{"id": eid, "image": uri, "target_text": "a blue circle"} for eid, (uri, _) in bad_inputs.items()]
    ok = {"image": image("plain.png"), "target_text": "a blue circle"}
    bad_entries = {  # id → what the entry gets wrong (rejected at validation: reason invalid_entry)
        "ftp": {"image": "ftp://host/x.png"}, "s3-no-key": {"image": "s3://bucket"},
        "control-uri": {"image": image("pla\x01in.png")}, "empty-text": {"target_text": "  "},
        "surrogate": {"target_text": "a \ud83d cat"}, "nul-text": {"target_text": "a\x00cat"},
        "eta-high": {"etas": [7]}, "eta-text": {"etas": "high"}, "eta-empty": {"etas": []},
        "eta-repeat": {"etas": [1.0, 1.0]}, "seed-negative": {"seeds": [-1]}, "seed-float": {"seeds": [1.5]},
        "preset": {"preset": "turbo"}, "unknown-override": {"overrides": {"colour": "red"}},
        "override-type": {"overrides": {"finetune_steps": "many"}}, "steps-budget": {"overrides": {"embedding_steps": 10**9}},
        "grid-budget": {"etas": [i / 500 for i in range(1, 1000)], "seeds": list(range(10))},
        "batch-budget": {"overrides": {"train_batch_size": 10**6}},
        "deep": {"overrides": {"x": json.loads("[" * 40 + "]" * 40)}}, "extra-field": {"colour": "red"},
    }
    lines += [{"id": eid, **ok, **change} for eid, change in bad_entries.items()]
    lines += [{"id": "../escape", **ok}, {"id": "plain-dup", **ok}, {"id": "plain-dup", **ok}]
    run_time = {  # valid entries that fail when they run (reason: invalid_request)
        "long-text": {"target_text": "a blue circle " * 40}, "lora-target": {"overrides": {"lora_target_modules": ["nope"]},
                                                                           "preset": "fast"},
    }
    lines += [{"id": eid, **ok, **change} for eid, change in run_time.items()]
    text = "\n".join(json.dumps(line) for line in lines) + '\n[1, 2]\n{"image": \n'
    manifest = tmp_path / "probe.jsonl"
    manifest.write_text(text, encoding="utf-8", errors="surrogatepass")

    out = tmp_path / "out"
    state = bulk_edit(str(manifest), str(out), model=str(tiny_dir), max_failure_fraction=1.0, return_state=True)
    assert state.is_completed(), state.message
    report = json.loads(next(out.glob("_batches/*/report.json")).read_text())
    rows = {row["entry_id"]: row for row in report["entries"]}
    kinds = len(good) + len(bad_inputs) + len(bad_entries) + 3 + len(run_time) + 2
    assert kinds >= 45 and report["counts"]["total"] == len(rows) == kinds

    assert {eid: rows[eid]["status"] for eid in good} == {eid: "succeeded" for eid in good}
    assert rows["plain-dup"]["status"] == "succeeded"  # the first of two lines with one id runs
    wide = json.loads((out / "good-wide" / "record.json").read_text())
    assert wide["input"]["transform"]["size"][0] > wide["input"]["transform"]["size"][1]  # kept its aspect
    for eid, (_, reason) in bad_inputs.items():
        assert (rows[eid]["status"], rows[eid]["reason"]) == ("failed", reason), (eid, rows[eid])
    for eid in run_time:
        assert (rows[eid]["status"], rows[eid]["reason"]) == ("failed", "invalid_request"), (eid, rows[eid])
    invalid = [row for row in rows.values() if row.get("reason") == "invalid_entry"]
    assert len(invalid) == len(bad_entries) + 4  # + bad id, the duplicate id, not an object, invalid JSON
    for row in rows.values():
        if row["status"] == "failed":
            assert row["message"] and len(row["message"]) < 2000 and "Traceback" not in row["message"]
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".html"))
    assert not [s for s in SECRETS if s.encode() in written]
    assert sorted(p.name for p in tmp_path.iterdir() if "escape" in p.name) == []  # no folder outside the output


FAULTS = {"lost answers": {"lose": 0.3}, "500s": {"fail": 0.6}}


@pytest.mark.parametrize("fault", FAULTS)
def test_s3_faults_end_every_entry_with_its_reason_and_a_clean_rerun_completes_the_rest(
        prefect, tmp_path, tiny_dir, s3_env, s3_faults, fault):
    """Inputs and outputs in S3 behind a proxy that loses 30 % of its answers (the request done) or answers
    60 % with a 500: the run ends with a summary, every entry finished or failed with its reason (none
    stranded as another run's); a clean re-run right after edits what is left, each entry exactly once."""
    from flows.bulk_edit import bulk_edit
    from imagic.batch.outputs import scan
    from imagic.io.storage import open_storage

    bucket = open_storage(f"s3://{s3_env}")
    draw_scene().save(tmp_path / "a.png")
    ids = [f"e{i}" for i in range(4)]
    for name in ids:
        bucket.write_bytes(f"in/{name}.png", (tmp_path / "a.png").read_bytes())
    jsonl_manifest(tmp_path / "m.jsonl", {name: f"s3://{s3_env}/in/{name}.png" for name in ids})
    out = f"s3://{s3_env}/out"

    s3_faults(**FAULTS[fault])
    state = bulk_edit(str(tmp_path / "m.jsonl"), out, model=str(tiny_dir), max_failure_fraction=1.0,
                      return_state=True)
    s3_faults()
    # The summary accounts for every entry as this run's own (none left "in progress in another run"), and
    # each is finished in the store or failed, with its reason in its error record or in the report.
    said = {status: int(count) for count, status in re.findall(r"(\d+) (succeeded|failed)", state.message)}
    assert sum(said.values()) == len(ids) and "in progress" not in state.message, state.message
    assert state.is_completed() or state.message.startswith("the batch's report could not be written"), state.message
    store = open_storage(out)
    attempts = scan(store.list())
    assert sum(bool(attempts.get(name) and attempts[name].finished) for name in ids) == said.get("succeeded", 0)
    for name in ids:
        if attempts.get(name) and attempts[name].failed:
            reason = json.loads(store.read_bytes(f"{name}/error.json"))["error"]["reason"]
            assert reason in ("storage_error", "input_unreadable"), (name, reason)

    state = bulk_edit(str(tmp_path / "m.jsonl"), out, model=str(tiny_dir), return_state=True)
    assert state.is_completed(), state.message
    attempts = scan(store.list())
    assert {name: sorted(attempts[name].finished) for name in ids} == {name: [max(attempts[name].started)]
                                                                      for name in ids}
    assert all(len(attempts[name].finished) == 1 for name in ids)


KILL_POINTS = {  # where `imagic run` is killed: the first moment a listing of the store shows it
    "claimed": lambda keys: any(key.startswith("e0/.claims/") for key in keys),  # stage A under way
    "mid-fine-tune": lambda keys: "e0/.resume.safetensors" in keys,  # a checkpoint of its training saved
    # S3 (moto over HTTP), where a PUT takes long enough to be caught between the first image and the record
    "uploading": lambda keys: any(key.endswith(".png") for key in keys) and "e0/record.json" not in keys,
    "between-entries": lambda keys: "e0/record.json" in keys,
    "before-report": lambda keys: "e1/record.json" in keys,
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_then_an_immediate_rerun_finishes_every_entry_exactly_once(prefect, tmp_path, tiny_dir, point,
                                                                          request):
    import prefect.settings
    import psutil

    from flows.bulk_edit import bulk_edit
    from imagic.batch.outputs import scan
    from imagic.io.storage import open_storage

    draw_scene().save(tmp_path / "a.png")
    steps = {"embedding_steps": 30, "finetune_steps": 30, "num_inference_steps": 2}
    jsonl_manifest(tmp_path / "m.jsonl", {name: str(tmp_path / "a.png") for name in ("e0", "e1")}, steps)
    out = f"s3://{request.getfixturevalue('s3_env')}/out" if point == "uploading" else str(tmp_path / "out")
    store = open_storage(out)
    env = {**os.environ, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(),
           "IMAGIC_CHECKPOINT_EVERY_STEPS": "5"}
    run = subprocess.Popen([sys.executable, "-m", "imagic", "run", str(tmp_path / "m.jsonl"), "-o", out,
                            "--model", str(tiny_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not KILL_POINTS[point](store.list()):
        assert run.poll() is None and time.monotonic() < deadline, f"the run ended before {point}"
        time.sleep(0.02)
    children = psutil.Process(run.pid).children(recursive=True)
    run.kill()
    run.wait()
    assert KILL_POINTS[point](store.list()), f"killed after {point}"
    assert not psutil.wait_procs(children, timeout=15)[1]  # nothing it started outlives it

    state = bulk_edit(str(tmp_path / "m.jsonl"), out, model=str(tiny_dir), return_state=True)
    assert state.is_completed(), state.message
    assert re.match(r"\d+ succeeded, 0 failed, \d+ skipped$", state.message), state.message
    attempts = scan(store.list())
    assert {name: (a.started, a.finished) for name, a in attempts.items()} == {"e0": ({1}, {1}), "e1": ({1}, {1})}


def test_two_runs_of_one_batch_at_once_share_its_entries_and_each_counts_its_own(prefect, tmp_path, tiny_dir):
    """Two `imagic run --wait-held` of one manifest started together: both exit 0, each says what it edited
    (together every entry, once), none is edited twice."""
    import prefect.settings

    from imagic.batch.outputs import scan
    from imagic.io.storage import LocalStorage

    draw_scene().save(tmp_path / "a.png")
    names = [f"e{i}" for i in range(4)]
    jsonl_manifest(tmp_path / "m.jsonl", {name: str(tmp_path / "a.png") for name in names})
    env = {**os.environ, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(), "COLUMNS": "200"}
    runs = [subprocess.Popen([sys.executable, "-m", "imagic", "run", str(tmp_path / "m.jsonl"), "-o",
                              str(tmp_path / "out"), "--model", str(tiny_dir), "--chunk-size", "1", "--wait-held", "300"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    edited = [int(re.search(r"done: (\d+) succeeded", output).group(1)) for output in outputs]
    assert sum(edited) == len(names), outputs
    attempts = scan(LocalStorage(tmp_path / "out").list())
    assert {name: (a.started, a.finished) for name, a in attempts.items()} == {name: ({1}, {1}) for name in names}
