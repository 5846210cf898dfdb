import json

import pytest
from PIL import Image
from typer.main import get_command
from typer.testing import CliRunner

from imagic.cli import app

from .conftest import draw_scene

runner = CliRunner()
QUICK = ["--set", "embedding_steps=4", "--set", "finetune_steps=4", "--set", "num_inference_steps=3"]


@pytest.fixture
def input_file(tmp_path):
    path = tmp_path / "red circle.png"
    draw_scene(size=80).save(path)
    return path


def test_edit_writes_images_sheet_artifacts_and_record(input_file, tmp_path, tiny_dir):
    out = tmp_path / "out"
    result = runner.invoke(app, ["edit", str(input_file), "--target", "a blue circle", "--eta", "0.6,0.8",
                                 "--eta", "1.1", "--seed", "0", "--seed", "5", "--model", str(tiny_dir),
                                 "--out", str(out), "--device", "cpu", *QUICK])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    expected = {f"eta-{e}_seed-{s}.png" for e in ("0.60", "0.80", "1.10") for s in (0, 5)}
    assert expected | {"input.png", "contact_sheet.png", "record.json", "artifacts"} == names
    record = json.loads((out / "record.json").read_text())
    assert record["etas"] == [0.6, 0.8, 1.1] and record["seeds"] == [0, 5]
    assert record["config"]["finetune_method"] == "lora" and record["config"]["finetune_steps"] == 4
    assert len(record["losses"]["embedding"]) == 4 and record["seconds"]["total"] > 0
    assert len(record["input"]["sha256"]) == 64 and record["versions"]["torch"]
    assert Image.open(out / "contact_sheet.png").width > 4 * 32


def test_render_adds_new_etas_from_the_saved_edit(input_file, tmp_path, tiny_dir):
    out = tmp_path / "out"
    args = ["edit", str(input_file), "-t", "a blue circle", "--eta", "1.0", "--model", str(tiny_dir),
            "--out", str(out), *QUICK]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["render", str(out), "--eta", "1.0,1.2", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert (out / "eta-1.20_seed-2.png").is_file() and (out / "render_contact_sheet.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eta", "5"], "eta 5.0 is outside [0.0, 2.0]"),
        (["--preset", "slow"], "unknown preset"),
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
    assert result.exit_code == 1
    assert "line 1: etas: must be a non-empty list of numbers in [0, 2]" in result.output
    assert "line 2: target_text: Field required" in result.output


def test_manifest_validate_accepts_the_example():
    result = runner.invoke(app, ["manifest", "validate", "examples/manifest.jsonl"])
    assert result.exit_code == 0 and "valid: 5 entries" in result.output


def test_manifest_schema_is_json():
    result = runner.invoke(app, ["manifest", "schema"])
    assert result.exit_code == 0 and "target_text" in json.loads(result.output)["entry"]["properties"]


def test_status_counts_finished_and_failed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "record.json").write_text("{}")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "error.json").write_text(json.dumps({"error": {"reason": "input_unreadable"}}))
    result = runner.invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 0 and "1 finished, 1 failed (input_unreadable: 1)" in result.output
