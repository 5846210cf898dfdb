"""A spot GPU reclaimed mid-fine-tune: the chunk run gets SIGTERM, saves the training it has into the attempt
folder, releases its claim and exits; the next try resumes the entry from that step, and the edit is the one
an uninterrupted run makes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from imagic.batch.claims import live_claim
from imagic.batch.manifest import entries_jsonl, parse_manifest
from imagic.batch.outputs import RESUME_FILE
from imagic.batch.run import run_entry
from imagic.batch.settings import Settings
from imagic.engine.checkpoints import Checkpoints
from imagic.io.storage import LocalStorage

from tests.conftest import draw_scene

REPO = Path(__file__).resolve().parents[2]
STEPS = 400


def test_a_chunk_run_stopped_mid_finetune_resumes_where_it_stopped(prefect, editor, tiny_dir, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    draw_scene().save(tmp_path / "a.png")
    overrides = {"embedding_steps": 4, "finetune_steps": STEPS, "num_inference_steps": 2}
    rows = [{"defaults": {"etas": [1.0], "overrides": overrides}},
            {"id": "a", "image": str(tmp_path / "a.png"), "target_text": "a blue circle"}]
    [entry] = parse_manifest("\n".join(json.dumps(r) for r in rows), "jsonl")
    store = LocalStorage(tmp_path / "out")
    store.write_bytes("_batches/b/chunks/c1.jsonl", entries_jsonl([entry]))
    script = (f"from flows.edit_chunk import edit_chunk; edit_chunk(entries=[{{'id': 'a', 'attempt': 1}}], "
              f"output_uri={str(store.root)!r}, model={str(tiny_dir)!r}, device='cpu', "
              f"chunk='_batches/b/chunks/c1.jsonl', holder='run-1')")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "IMAGIC_CHECKPOINT_EVERY_STEPS": "10",
           "IMAGIC_ALLOWED_INPUTS": "file:", "PYTHONPATH": str(REPO)}
    chunk_run = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    resume = store.root / "a" / RESUME_FILE
    deadline = time.monotonic() + 240
    while "base.finetune" not in (Checkpoints.from_bytes(resume.read_bytes()).loops if resume.exists() else {}):
        assert chunk_run.poll() is None, chunk_run.stdout.read()
        assert time.monotonic() < deadline, "the chunk run never reached the fine-tune"
        time.sleep(0.05)
    chunk_run.send_signal(signal.SIGTERM)  # what the kubelet sends when a spot node is reclaimed
    output, _ = chunk_run.communicate(timeout=120)
    assert chunk_run.returncode != 0 and "ChunkPreempted" in output, output
    saved = Checkpoints.from_bytes(resume.read_bytes()).loops
    stopped_at = saved["base.finetune"].step
    assert saved["base.embedding"].step == 4 and 0 < stopped_at < STEPS, stopped_at
    assert not store.exists("a/record.json") and live_claim(store, "a") is None  # claim released on the way out

    steps, loss = [], editor.denoising_loss
    monkeypatch.setattr(editor, "denoising_loss", lambda *a, **k: steps.append(1) or loss(*a, **k))
    settings = Settings.defaults().model_copy(update={"checkpoint_every_steps": 10})
    record = run_entry(editor, entry, store, model=str(tiny_dir), settings=settings, holder="run-2")
    assert record["status"] == "succeeded", record
    assert len(steps) == STEPS - stopped_at  # at most what ran after the stop is redone: nothing before it
    assert record["resumed"] == {"from": {"base.embedding": 4, "base.finetune": stopped_at}, "saved_every_steps": 10}
    assert not resume.exists()

    monkeypatch.setattr(editor, "denoising_loss", loss)
    whole = run_entry(editor, entry, store, model=str(tiny_dir), folder="whole", settings=settings)
    assert "resumed" not in whole
    assert store.read_bytes("a/eta-1.00_seed-0.png") == store.read_bytes("whole/eta-1.00_seed-0.png")
    assert record["losses"] == whole["losses"]
