"""A probe of hostile and careless input: one manifest mixing 40+ kinds of bad entries with good ones,
through `bulk_edit` (Prefect, local mode, tiny model) in ONE run. Every good entry is edited, every bad
one carries a clear reason, nothing leaks a credential, and the batch survives to write its report."""

import json
import os

import numpy as np
from PIL import Image

from tests.conftest import QUICK, draw_scene

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
