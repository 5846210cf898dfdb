"""`imagic` command line: a thin shell over the library; each command calls one thing and maps errors."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from imagic.batch import ERROR_FILE, RECORD_FILE, SHEET_FILE, entry_ids
from imagic.config import DEFAULT_ETAS, DEFAULT_PRESET, DEFAULT_SEEDS, PRESETS, make_config

app = typer.Typer(help="Text-based editing of real images with diffusion models (Imagic).", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)

DEFAULT_MODEL = "toy"

EtaOption = Annotated[list[str] | None, typer.Option(
    "--eta", help=f"η values, comma-separated and/or repeated [default: {','.join(map(str, DEFAULT_ETAS))}]")]
SeedOption = Annotated[list[str] | None, typer.Option(
    "--seed", help="Render seeds, comma-separated and/or repeated [default: 0]")]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (CUDA when there is one).")]


@app.command()
def edit(
    image: Annotated[Path, typer.Argument(help="Input image file.")],
    target: Annotated[str, typer.Option("--target", "-t", help="Target text: what the image should show.")],
    eta: EtaOption = None,
    seed: SeedOption = None,
    preset: Annotated[str, typer.Option(help=f"One of: {', '.join(PRESETS)}.")] = DEFAULT_PRESET,
    model: Annotated[str, typer.Option(help="Hub id, local diffusers directory, or built-in toy / tiny.")] = (
        DEFAULT_MODEL
    ),
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/edit"),
    device: DeviceOption = "auto",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config field, KEY=VALUE (repeatable), e.g. --set finetune_steps=100.")] = None,
) -> None:
    """Edit one image towards a text.

    Example: imagic edit photo.png --target "a dog sitting" --eta 0.6,0.7,0.8 --seed 0 --out out/dog
    """
    from imagic import Editor, load_image
    from imagic.model_store import model_sha256
    from imagic.record import edit_record
    from imagic.sheet import contact_sheet
    from imagic.storage import LocalStorage, read_uri

    with _errors():
        etas = _floats(eta) if eta else list(DEFAULT_ETAS)
        seeds = _ints(seed) if seed else list(DEFAULT_SEEDS)
        config = make_config(preset, **_overrides(set_ or []))
        input_bytes = read_uri(str(image))
        picture = load_image(input_bytes, name=str(image))
        editor = Editor(_load(model, device))
        editor.check_inputs(config, etas, seeds)
        with _progress() as progress:
            result = editor.edit(picture, target, config, etas, seeds, callback=progress)
        out.mkdir(parents=True, exist_ok=True)
        result.save(out)
        contact_sheet(result.input_image, result.images, title=target, selection=result.selection).save(out / SHEET_FILE)
        record = edit_record(
            result, input_uri=str(image), input_bytes=input_bytes, model=model,
            model_sha256=model_sha256(editor.pipeline.name_or_path), preset=preset,
            device=str(editor.device), outputs={"contact_sheet": SHEET_FILE, "artifacts": "artifacts/"},
        )
        # Last, and atomically (temp file + rename): a record on disk always means a finished edit.
        LocalStorage(out).write_bytes(RECORD_FILE, (json.dumps(record, indent=2) + "\n").encode())
    console.print(f"[green]done[/] in {record['seconds']['total']:.1f}s: {len(result.images)} images, "
                  f"contact sheet and record in {out}/")
    if result.selection is not None and result.selection.verdict == "selected":
        console.print(f"selected: η={result.selection.eta:g} seed={result.selection.seed} → {out}/selected.png")
    elif result.selection is not None:
        console.print(f"[yellow]needs review[/]: {result.selection.reason}")


@app.command()
def render(
    edit_dir: Annotated[Path, typer.Argument(help="Directory of a finished `imagic edit`.")],
    eta: EtaOption = None,
    seed: SeedOption = None,
    model: Annotated[str | None, typer.Option(help="Base model [default: the one in the edit's record].")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory [default: EDIT_DIR].")] = None,
    device: DeviceOption = "auto",
) -> None:
    """Render new η/seed images from a saved edit, without retraining."""
    from imagic import EditResult, Editor
    from imagic.result import image_name
    from imagic.sheet import contact_sheet

    with _errors():
        result = EditResult.load(edit_dir)
        etas = _floats(eta) if eta else result.etas
        seeds = _ints(seed) if seed else result.seeds
        if model is None:
            record_file = edit_dir / RECORD_FILE
            model = json.loads(record_file.read_text())["model"] if record_file.is_file() else DEFAULT_MODEL
        editor = Editor(_load(model, device))
        images = editor.render_result(result, etas, seeds)
        out = out or edit_dir
        out.mkdir(parents=True, exist_ok=True)
        for (e, s), picture in images.items():
            picture.save(out / image_name(e, s))
        contact_sheet(result.input_image, images, title=result.target_text).save(out / f"render_{SHEET_FILE}")
    console.print(f"[green]rendered[/] {len(images)} images into {out}/")


@app.command()
def run(
    manifest: Annotated[str, typer.Argument(help="Manifest file or URI (.jsonl, .csv, .yaml).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output folder or s3://bucket/prefix.")],
    mode: Annotated[str, typer.Option(help="local (this process) or deployment (edit-chunk on a work pool).")] = "local",
    model: Annotated[str | None, typer.Option(
        help="Model for every entry [default: the manifest's defaults.model, else toy].")] = None,
    preset: Annotated[str | None, typer.Option(help="Override the manifest's presets.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config field, KEY=VALUE.")] = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="Entries per worker run.")] = 8,
    max_in_flight: Annotated[int, typer.Option(min=1, help="Chunks running at once (deployment mode).")] = 4,
    device: DeviceOption = "auto",
    max_failure_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Above this share of failed entries the batch ends Failed (exit 1).")] = 0.5,
) -> None:
    """Edit every entry of a manifest with Prefect (resumable: finished entries are skipped).

    Example: imagic run examples/manifest.jsonl --output out/batch
    """
    if mode not in ("local", "deployment"):
        raise typer.BadParameter("--mode is local or deployment")
    from flows.bulk_edit import bulk_edit

    with _errors():
        overrides = _overrides(set_ or []) or None
        with _batch_progress(manifest, output, preset, overrides):
            state = bulk_edit(manifest, output, mode=mode, model=model, preset=preset, overrides=overrides,
                              chunk_size=chunk_size, max_in_flight=max_in_flight, device=device,
                              max_failure_fraction=max_failure_fraction, return_state=True)
    if not state.is_completed():
        console.print(f"[red]batch {state.name.lower()}:[/] {escape(str(state.message))}", soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]done:[/] {state.message}; outputs in {output}")


manifest_app = typer.Typer(help="Manifests: validate them, print their JSON Schema.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")


@manifest_app.command("validate")
def manifest_validate(
    manifest: Annotated[str, typer.Argument(help="Manifest file or URI (.jsonl, .csv, .yaml).")],
) -> None:
    """Check a manifest and print every problem with its line; exit 1 if there are any."""
    from imagic.manifest import detect_format, parse_manifest
    from imagic.storage import read_uri

    with _errors():
        entries = parse_manifest(read_uri(manifest).decode("utf-8"), detect_format(manifest))
    console.print(f"[green]valid:[/] {len(entries)} entries, {sum(len(e.etas) * len(e.seeds) for e in entries)} images")


@manifest_app.command("schema")
def manifest_schema() -> None:
    """Print the JSON Schema of a manifest entry and of the file-level defaults."""
    from imagic.manifest import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def status(output: Annotated[str, typer.Argument(help="Output folder or s3:// prefix of a batch.")]) -> None:
    """Summarise a batch's output: finished, failed (with reasons) and latest report."""
    from collections import Counter

    from imagic.storage import open_storage

    with _errors():
        store = open_storage(output)
        keys = store.list()
    done = entry_ids(store, RECORD_FILE, keys)
    failed = entry_ids(store, ERROR_FILE, keys) - done
    reasons = Counter(json.loads(store.read_bytes(f"{entry}/{ERROR_FILE}"))["error"]["reason"] for entry in failed)
    reports = sorted(k for k in keys if k.startswith("_batches/") and k.endswith("/report.json"))
    console.print(f"{len(done)} finished, {len(failed)} failed"
                  + (f" ({', '.join(f'{r}: {n}' for r, n in reasons.items())})" if reasons else ""))
    if reports:
        report = json.loads(store.read_bytes(reports[-1]))
        missing = report["counts"]["total"] - len(done) - len(failed)
        console.print(f"last report: {store.url_for(reports[-1])} ({report['counts']['total']} entries, "
                      f"{max(0, missing)} missing)")


def _load(model: str, device: str):
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from imagic import load_pipeline
    from imagic.model_store import local_model

    diffusers_logging.disable_progress_bar()  # the status spinner says it; tqdm would fight rich
    transformers_logging.disable_progress_bar()

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with console.status(f"loading {model} on {device}"):
        return load_pipeline(local_model(model), device)


def _split(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _floats(values: list[str]) -> list[float]:
    try:
        return [float(v) for v in _split(values)]
    except ValueError as err:
        raise typer.BadParameter(f"--eta takes numbers: {err}") from None


def _ints(values: list[str]) -> list[int]:
    try:
        return [int(v) for v in _split(values)]
    except ValueError as err:
        raise typer.BadParameter(f"--seed takes integers: {err}") from None


def _overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value  # a bare string such as finetune_method=lora
    return overrides


@contextlib.contextmanager
def _batch_progress(manifest: str, output: str, preset: str | None, overrides: dict | None):
    """A bar of the manifest's entries finished in the output store (polled: it works whether the
    entries run in this process or on a work pool). An unreadable manifest shows no bar; the flow reports it."""
    from imagic.manifest import detect_format, validate_manifest
    from imagic.storage import open_storage, read_uri

    try:
        entries, _, _ = validate_manifest(read_uri(manifest).decode(), detect_format(manifest), preset=preset,
                                          overrides=overrides)
        store = open_storage(output)
        failed_before = entry_ids(store, ERROR_FILE)
    except Exception:
        yield
        return
    ids, stop = {e.id for e in entries}, threading.Event()
    bar = Progress(TextColumn("[bold]entries"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                   TimeRemainingColumn(), console=console, transient=True)
    task = bar.add_task("entries", total=len(ids), note="")

    def watch() -> None:
        while True:
            try:
                keys = store.list()
            except Exception:  # the store is the flow's business; the bar just waits
                keys = None
            if keys is not None:
                done = entry_ids(store, RECORD_FILE, keys) & ids
                failed = (entry_ids(store, ERROR_FILE, keys) & ids) - failed_before - done
                bar.update(task, completed=len(done | failed), note=f"{len(failed)} failed" if failed else "")
            if stop.wait(2.0):
                return

    watcher = threading.Thread(target=watch, daemon=True)
    with bar:
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


class _progress:
    """Rich progress bars per stage (step, loss, ETA) that the engine drives through its callback."""

    def __enter__(self):
        self.bars = Progress(
            TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=console,
        )
        self.tasks: dict[str, int] = {}
        self.bars.__enter__()
        return self

    def __call__(self, stage: str, step: int, total: int, loss: float) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(stage, total=total, loss=loss)
        self.bars.update(self.tasks[stage], completed=step, loss=loss)

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)


class _errors:
    """Turn the library's input errors into one red line and exit code 2, not a traceback."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        from imagic import ImageError, ModelError
        from imagic.manifest import ManifestError
        from imagic.storage import StorageError

        if isinstance(error, ManifestError):  # every problem, one per line
            for problem in error.problems:
                console.print(escape(problem), soft_wrap=True)
            console.print(f"[red]{len(error.problems)} problem(s)[/]")
            raise typer.Exit(1)
        if isinstance(error, ValidationError):
            details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
            console.print(f"[red]error:[/] invalid config: {escape(details)}", soft_wrap=True)
        elif isinstance(error, (ImageError, ModelError, StorageError, ValueError, FileNotFoundError)):
            console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        else:
            return False
        raise typer.Exit(2)


if __name__ == "__main__":
    app()
