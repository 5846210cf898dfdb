import io
import json

import pytest
from PIL import Image
from typer.main import get_command
from typer.testing import CliRunner

from imagic.cli import app

from tests.conftest import QUICK, draw_scene

runner = CliRunner()
QUICK_ARGS = [arg for key, value in QUICK.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture
def input_file(tmp_path):
    path = tmp_path / "red circle.png"
    draw_scene(size=80).save(path)
    return path


def test_edit_writes_images_sheet_artifacts_and_record(input_file, tmp_path, tiny_dir):
    out = tmp_path / "out"
    result = runner.invoke(app, ["edit", str(input_file), "--target", "a blue circle", "--eta", "0.6,0.8",
                                 "--eta", "1.1", "--seed", "0", "--seed", "5", "--model", str(tiny_dir),
                                 "--out", str(out), "--device", "cpu", *QUICK_ARGS])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    expected = {f"eta-{e}_seed-{s}.png" for e in ("0.60", "0.80", "1.10") for s in (0, 5)}
    assert expected | {"input.png", "contact_sheet.png", "record.json", "artifacts"} == names
    record = json.loads((out / "record.json").read_text())
    assert record["etas"] == [0.6, 0.8, 1.1] and record["seeds"] == [0, 5]
    assert record["config"]["finetune_method"] == "lora"
    assert record["config"]["finetune_steps"] == QUICK["finetune_steps"]
    assert len(record["losses"]["embedding"]) == QUICK["embedding_steps"] and record["seconds"]["total"] > 0
    assert len(record["input"]["sha256"]) == 64 and record["versions"]["torch"]
    assert Image.open(out / "contact_sheet.png").width > 4 * 32


def test_render_adds_new_etas_from_the_saved_edit(input_file, tmp_path, tiny_dir):
    out = tmp_path / "out"
    args = ["edit", str(input_file), "-t", "a blue circle", "--eta", "1.0", "--model", str(tiny_dir),
            "--out", str(out), *QUICK_ARGS]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["render", str(out), "--eta", "1.0,1.2", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert (out / "eta-1.20_seed-2.png").is_file() and (out / "render_contact_sheet.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eta", "5"], "etas: must be a non-empty list of distinct numbers in [0, 2]"),
        (["--preset", "slow"], "'slow' is not one of"),
        (["--set", "finetune_steps=-3"], "finetune_steps"),
        (["--set", "mixed_precision=bf16", "--device", "cpu"], "need a CUDA device"),
    ],
)
def test_bad_options_are_one_clear_line(input_file, tmp_path, tiny_dir, args, message):
    result = runner.invoke(app, ["edit", str(input_file), "-t", "x", "--model", str(tiny_dir),
                                 "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "o" / "record.json").exists()


def test_bad_image_names_the_file(tmp_path, tiny_dir):
    bad = tmp_path / "scan.png"
    bad.write_text("not an image")
    result = runner.invoke(app, ["edit", str(bad), "-t", "x", "--model", str(tiny_dir), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "scan.png: not an image" in result.output


def test_every_command_has_help():
    command = get_command(app)
    for name, sub in command.commands.items():
        assert sub.help, name
        assert runner.invoke(app, [name, "--help"]).exit_code == 0


def test_manifest_validate_reports_every_problem(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.png", "target_text": "x", "etas": [9]}\n{"image": "b.png"}\n')
    result = runner.invoke(app, ["manifest", "validate", str(path)])
    assert result.exit_code == 2
    assert "line 1: etas: must be a non-empty list of distinct numbers in [0, 2]" in result.output
    assert "line 2: target_text: Field required" in result.output


def test_manifest_validate_accepts_the_example():
    result = runner.invoke(app, ["manifest", "validate", "examples/manifest.jsonl"])
    assert result.exit_code == 0 and "valid: 5 entries" in result.output


def test_manifest_schema_is_json():
    result = runner.invoke(app, ["manifest", "schema"])
    assert result.exit_code == 0 and "target_text" in json.loads(result.output)["entry"]["properties"]


def test_edit_reads_an_s3_uri(s3_env, tmp_path, tiny_dir):
    """`imagic edit s3://b/x.png` reads the object (a Path argument once collapsed `//` to `s3:/b/x.png`)."""
    from imagic.io.storage import open_storage

    path = tmp_path / "x.png"
    draw_scene(size=64).save(path)
    open_storage(f"s3://{s3_env}").write_bytes("in/x.png", path.read_bytes())
    out = tmp_path / "out"
    result = runner.invoke(app, ["edit", f"s3://{s3_env}/in/x.png", "-t", "a blue circle", "--eta", "1.0",
                                 "--model", str(tiny_dir), "--out", str(out), *QUICK_ARGS])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "record.json").read_text())["input"]["uri"] == f"s3://{s3_env}/in/x.png"


def test_the_version_and_defaults_are_shown():
    assert runner.invoke(app, ["--version"]).output.startswith("imagic-batch ")
    text = " ".join(runner.invoke(app, ["edit", "--help"], env={"COLUMNS": "250"}).output.split())
    assert "[default: (0.8,1.0,1.2,1.4,1.6,1.8,2.0)]" in text and "[default: anchored]" in text


def run_cli_in_a_fresh_process(*args: str) -> dict:
    """Exit code, output and whether torch / Prefect were imported, in a new interpreter."""
    import subprocess
    import sys

    code = ("import json, sys; from typer.testing import CliRunner; from imagic.cli import app; "
            f"r = CliRunner().invoke(app, {list(args)!r}); "
            "print(json.dumps({'code': r.exit_code, 'output': r.output, "
            "'torch': 'torch' in sys.modules, 'prefect': 'prefect' in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args, message", [
    (["--help"], "Text-based editing"),
    (["run", "missing.jsonl", "--output", "out"], "missing.jsonl: cannot read (No such file or directory)"),
    (["run", "examples/manifest.jsonl", "--output", "ftp://x/y"], "unsupported storage URI 'ftp://x/y'"),
    (["run", "examples/manifest.txt", "--output", "out"], "unknown manifest format"),
])
def test_help_and_a_bad_run_answer_without_torch_or_prefect(args, message):
    """A bad file: one line and exit 2, before Prefect starts and without retries (it once took 44 s)."""
    result = run_cli_in_a_fresh_process(*args)
    assert message in " ".join(result["output"].split())
    assert result["code"] == (0 if args == ["--help"] else 2) and "Traceback" not in result["output"]
    assert not result["torch"] and not result["prefect"]
    if args != ["--help"]:
        assert len(result["output"].strip().splitlines()) == 1


def test_status_of_a_missing_output_is_an_error(tmp_path):
    result = runner.invoke(app, ["status", str(tmp_path / "typo")])
    assert result.exit_code == 2 and "no outputs here" in result.output


def test_status_counts_finished_and_failed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "record.json").write_text("{}")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "error.json").write_text(json.dumps({"error": {"reason": "input_unreadable"}}))
    result = runner.invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 0 and "1 finished, 1 failed (input_unreadable: 1)" in result.output


def test_status_reads_the_newest_report_and_no_other(tmp_path, monkeypatch):
    from imagic.batch.report import batch_status
    from imagic.io.storage import LocalStorage

    store = LocalStorage(tmp_path)
    for batch, run, total in [("old", "20261201T000000Z-aaaa", 5), ("new", "20261202T000000Z-bbbb", 7),
                              ("mid", "20261201T120000Z-cccc", 6)]:
        report = json.dumps({"batch_id": batch, "created_at": run, "counts": {"total": total}}).encode()
        store.write_bytes(f"_batches/{batch}/runs/{run}/report.json", report)
        store.write_bytes(f"_batches/{batch}/report.json", report)
    store.write_bytes("a/record.json", b"{}")
    reads, read = [], store.read_bytes
    monkeypatch.setattr(store, "read_bytes", lambda key: reads.append(key) or read(key))
    status = batch_status(store, str(tmp_path))
    assert status["last_report"]["batch_id"] == "new" and status["last_report"]["counts"]["total"] == 7
    assert reads == ["_batches/new/runs/20261202T000000Z-bbbb/report.json"]


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_stopped_run_leaves_no_process_behind(tmp_path, tiny_dir, signum):
    """`imagic run` killed mid-batch once left its temporary Prefect server running (13 over 15 kills)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    draw_scene().save(tmp_path / "a.png")
    rows = [{"defaults": {"etas": [1.0], "overrides": {"embedding_steps": 5000, "finetune_steps": 5000}}},
            {"id": "a", "image": str(tmp_path / "a.png"), "target_text": "a blue circle"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = subprocess.Popen([sys.executable, "-m", "imagic", "run", str(tmp_path / "m.jsonl"), "-o", str(tmp_path / "out"),
                            "--model", str(tiny_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(run.pid)
    deadline = time.monotonic() + 90
    while not (tmp_path / "out" / "a").exists() and time.monotonic() < deadline:  # the edit has started
        time.sleep(0.5)
    children = parent.children(recursive=True)
    assert children, "the run started no temporary server"
    run.send_signal(getattr(signal, signum))
    run.wait(timeout=60)
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.cmdline() for p in alive]


def test_edit_on_a_cascade_uses_the_cascade_presets(input_file, tmp_path):
    """`--model base+super_resolution` (here the built-in tiny-if) picks the cascade's recipe for the preset."""
    out = tmp_path / "out"
    result = runner.invoke(app, ["edit", str(input_file), "--target", "a blue circle", "--eta", "1.0", "--model",
                                 "tiny-if", "--preset", "fast", "--out", str(out), "--device", "cpu", *QUICK_ARGS,
                                 "--set", "sr_num_inference_steps=2"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "record.json").read_text())
    assert "add_k_proj" in record["config"]["lora_target_modules"]
    assert record["stages"][1]["name"] == "super_resolution" and len(record["losses"]["finetune_sr"]) == 2
    assert Image.open(out / "eta-1.00_seed-0.png").size == (80, 80)  # the input's size
    original = (out / "eta-1.00_seed-0.png").read_bytes()
    (out / "eta-1.00_seed-0.png").unlink()
    # `render` reloads the cascade from the record and both models' weights from the delta: the same image.
    result = runner.invoke(app, ["render", str(out), "--eta", "1.0", "--seed", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert Image.open(out / "eta-1.00_seed-0.png").tobytes() == Image.open(io.BytesIO(original)).tobytes()
