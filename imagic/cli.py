"""`imagic` command line: a thin shell over the library; each command calls one thing and maps errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import imagic
from imagic.batch.outputs import ERROR_FILE, RECORD_FILE, SHEET_FILE, scan
from imagic.batch.plan import Redo
from imagic.engine.builtins import BUILTIN_MODELS, DEFAULT_MODEL
from imagic.engine.config import DEFAULT_PRESET, PRESETS
from imagic.engine.grid import DEFAULT_ETAS, DEFAULT_SEEDS

# Everything heavy (torch, diffusers, Prefect) is imported inside the command that needs it: `--help`,
# `--version`, `manifest validate` and a bad manifest given to `run` answer at once.
app = typer.Typer(help="Text-based editing of real images with diffusion models (Imagic).", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)

Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)


class Mode(str, Enum):
    local = "local"  # the entries run in this process
    deployment = "deployment"  # edit-chunk runs on a work pool


EtaOption = Annotated[list[str] | None, typer.Option(
    "--eta", help="η values, comma-separated and/or repeated.", show_default=",".join(map(str, DEFAULT_ETAS)))]
SeedOption = Annotated[list[str] | None, typer.Option(
    "--seed", help="Render seeds, comma-separated and/or repeated.", show_default=",".join(map(str, DEFAULT_SEEDS)))]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (CUDA when there is one).")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config field, KEY=VALUE (repeatable), e.g. --set finetune_steps=100.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"imagic-batch {imagic.__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """Text-based editing of real images with diffusion models (Imagic)."""


@app.command()
def edit(
    image: Annotated[str, typer.Argument(help="Input image: a path, file://, s3://bucket/key or http(s):// URL.")],
    target: Annotated[str, typer.Option("--target", "-t", help="Target text: what the image should show.")],
    eta: EtaOption = None,
    seed: SeedOption = None,
    preset: Annotated[Preset, typer.Option(help="Named set of config defaults.")] = DEFAULT_PRESET,
    model: Annotated[str, typer.Option(
        help=f"Hub id (pinned: org/name@revision), local diffusers directory, s3:// prefix, or "
             f"{' / '.join(BUILTIN_MODELS)}; a cascade is base+super_resolution.")] = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("out/edit"),
    device: DeviceOption = "auto",
    set_: SetOption = None,
) -> None:
    """Edit one image towards a text: the same per-entry path, outputs and record as a batch entry.

    Example: imagic edit photo.png --target "a dog sitting" --eta 0.6,0.7,0.8 --seed 0 --out out/dog
    """
    from imagic.batch.manifest import single_entry
    from imagic.batch.run import run_entry
    from imagic.batch.settings import Settings
    from imagic.io.storage import LocalStorage

    with _errors():
        settings = Settings.from_env()
        entry = single_entry(image, target, etas=_floats(eta) if eta else None, seeds=_ints(seed) if seed else None,
                             preset=Preset(preset).value, overrides=_overrides(set_ or []),
                             entry_id=_safe_id(out.name), model=model, settings=settings)
        editor = _editor(model, device)
        with _progress() as progress:
            record = run_entry(editor, entry, LocalStorage(out), model=model, folder="", callback=progress,
                               settings=settings)
    if record["status"] == "failed":
        console.print(f"[red]error:[/] {escape(record['error']['message'])} ({record['error']['reason']}; "
                      f"{out / ERROR_FILE})", soft_wrap=True)
        raise typer.Exit(2)
    console.print(f"[green]done[/] in {record['seconds']['total']:.1f}s: {len(record['outputs']['images'])} images, "
                  f"contact sheet and record in {out}/")
    selection = record["selection"]
    if selection and selection["verdict"] == "selected":
        console.print(f"selected: η={selection['eta']:g} seed={selection['seed']} → {out}/{selection['file']}")
    elif selection:
        console.print(f"[yellow]needs review[/]: {selection['reason']}")


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
    from imagic.batch.sheet import contact_sheet
    from imagic.engine.result import EditResult, image_name

    with _errors():
        result = EditResult.load(edit_dir)
        etas = _floats(eta) if eta else result.etas
        seeds = _ints(seed) if seed else result.seeds
        if model is None:
            record_file = edit_dir / RECORD_FILE
            model = json.loads(record_file.read_text())["model"] if record_file.is_file() else DEFAULT_MODEL
        editor = _editor(model, device)
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
    mode: Annotated[Mode, typer.Option(help="local: this process; deployment: edit-chunk on a work pool.")] = (
        Mode.local
    ),
    model: Annotated[str | None, typer.Option(help="Model for every entry.", show_default="the manifest's "
                                              f"defaults.model, else {DEFAULT_MODEL}")] = None,
    preset: Annotated[Preset | None, typer.Option(help="Override the manifest's presets.")] = None,
    set_: SetOption = None,
    redo: Annotated[Redo, typer.Option(help="Besides new entries, edit again: failed ones; also changed ones "
                                       "(their record answers another request); all; or none.")] = Redo.failed,
    check_inputs: Annotated[bool, typer.Option(help="Re-read finished entries' inputs to notice replaced "
                                               "images.")] = True,
    chunk_size: Annotated[int, typer.Option(min=1, help="Entries per worker run.")] = 8,
    max_in_flight: Annotated[int, typer.Option(min=1, help="Chunks running at once (deployment mode).")] = 4,
    device: DeviceOption = "auto",
    max_failure_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Above this share of failed entries the batch ends Failed (exit 1).")] = 0.5,
    wait_held: Annotated[float, typer.Option("--wait-held", min=0.0, metavar="SECONDS", help=(
        "Wait up to this long for entries another live run of this batch holds, and edit those it leaves "
        "undone; without it, such a run ends Failed (exit 1)."))] = 0.0,
    submit: Annotated[bool, typer.Option("--submit", help="Deployment mode: submit the bulk-edit deployment (the "
                                         "parent runs on the work pool) and return; follow it with "
                                         "`imagic status OUTPUT --follow`.")] = False,
) -> None:
    """Edit every entry of a manifest with Prefect. Resumable by request: entries finished with the same
    request are skipped; changed ones are reported and redone only with --redo changed.

    Example: imagic run examples/manifest.jsonl --output out/batch
    """
    from imagic.io.storage import open_storage

    with _errors():
        overrides = _overrides(set_ or []) or None
        preset_name = Preset(preset).value if preset else None
        entries, text = _validate(manifest, preset_name, overrides, model)  # before Prefect: a bad file costs no wait
        store = open_storage(output)  # a bad scheme, at once
        parameters = dict(output_uri=output, mode=Mode(mode).value, model=model, preset=preset_name,
                          overrides=overrides, chunk_size=chunk_size, max_in_flight=max_in_flight, device=device,
                          max_failure_fraction=max_failure_fraction, redo=Redo(redo).value, check_inputs=check_inputs,
                          wait_held_s=wait_held)
        if submit:
            return _submit(manifest, text, store, parameters)
        _stop_cleanly_on_signals()
        from flows.bulk_edit import bulk_edit

        with _batch_progress(entries, output):
            state = bulk_edit(manifest, return_state=True, **parameters)
    if not state.is_completed():
        console.print(f"[red]batch {state.name.lower()}:[/] {escape(str(state.message))}", soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]done:[/] {state.message}; outputs in {output}")


def _submit(manifest: str, text: str, store, parameters: dict) -> None:
    """Stage the manifest where the parent pod can read it, submit the parent, say how to follow it."""
    from flows.submit import submit_batch, ui_link
    from imagic.batch.manifest import stage_manifest
    from imagic.batch.outputs import batch_id_for

    if parameters["mode"] != Mode.deployment.value:
        raise typer.BadParameter("--submit runs the batch on the work pool: use it with --mode deployment")
    source = stage_manifest(store, manifest, text)
    batch_id = batch_id_for(manifest, parameters["output_uri"])  # the batch's, whichever copy the parent reads
    run = submit_batch({"manifest_uri": source, **parameters, "batch_id": batch_id})
    console.print(f"[green]submitted:[/] flow run {run.id} ({run.name}); manifest staged at {source}")
    if link := ui_link(run.id):
        console.print(f"UI: {link}")
    console.print(f"follow: imagic status {parameters['output_uri']} --follow --run {run.id}", soft_wrap=True)


def _stop_cleanly_on_signals() -> None:
    """SIGTERM and SIGHUP stop `imagic run` as Ctrl-C does, so that its exit handlers run: Prefect's
    temporary server (a child process) is stopped instead of being left behind; SIGKILL, by a watchdog."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    # SIGINT always interrupts, even when the shell started this as a background job (which ignores it);
    # SIGHUP only when not ignored on purpose (`nohup imagic run …` must survive a closed terminal).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, interrupt)
    # SIGKILL runs no handler: a watchdog beside this process stops what it started if it is killed.
    subprocess.Popen([sys.executable, "-m", "imagic.watchdog", str(os.getpid())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _validate(manifest: str, preset: str | None, overrides: dict | None,
              model: str | None = None) -> tuple[list, str]:
    """The manifest's valid entries and its text; a file that cannot run at all raises (one line per problem)."""
    from imagic.batch.manifest import detect_format, read_manifest_text, runnable, validate_manifest
    from imagic.batch.settings import Settings

    fmt = detect_format(manifest)
    text = read_manifest_text(manifest)
    return runnable(*validate_manifest(text, fmt, preset=preset, overrides=overrides, model=model,
                                       settings=Settings.from_env())), text


manifest_app = typer.Typer(help="Manifests: validate them, print their JSON Schema.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")


@manifest_app.command("validate")
def manifest_validate(
    manifest: Annotated[str, typer.Argument(help="Manifest file or URI (.jsonl, .csv, .yaml).")],
) -> None:
    """Check a manifest and print every problem with its line; exit 2 if there are any."""
    from imagic.batch.manifest import detect_format, parse_manifest, read_manifest_text
    from imagic.batch.settings import Settings

    with _errors():
        entries = parse_manifest(read_manifest_text(manifest), detect_format(manifest), settings=Settings.from_env())
    console.print(f"[green]valid:[/] {len(entries)} entries, {sum(len(e.etas) * len(e.seeds) for e in entries)} images")


@manifest_app.command("schema")
def manifest_schema() -> None:
    """Print the JSON Schema of a manifest entry and of the file-level defaults."""
    from imagic.batch.manifest import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def status(
    output: Annotated[str, typer.Argument(help="Output folder or s3:// prefix of a batch.")],
    manifest: Annotated[str | None, typer.Option(help="Also say what a run of this manifest would do: "
                                                 "to do, done, changed, failed.")] = None,
    model: Annotated[str | None, typer.Option(help="With --manifest: the model the run would use.",
                                              show_default=f"the manifest's, else {DEFAULT_MODEL}")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Follow the batch's parent run (submitted with "
                                         "`run --submit`) on the Prefect API until it ends.")] = False,
    run_id: Annotated[str | None, typer.Option("--run", help="With --follow: the parent's flow-run id.",
                                               show_default="the newest bulk-edit run into OUTPUT")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout, for scripts.")] = False,
) -> None:
    """Summarise a batch's output: finished, failed (with reasons), changed, and the latest report; with
    --follow, its running parent's progress (exit 1 if it does not end Completed)."""
    from imagic.batch.report import batch_status
    from imagic.io.storage import open_storage

    with _errors():
        if follow:
            _follow(output, run_id, as_json)
        store = open_storage(output)
        summary = batch_status(store, output)
        if as_json:
            typer.echo(json.dumps(summary))
            return
        reasons = summary["failure_reasons"]
        console.print(f"{summary['finished']} finished, {summary['failed']} failed"
                      + (f" ({', '.join(f'{r}: {n}' for r, n in reasons.items())})" if reasons else "")
                      + (f"; {summary['redone']} redone (earlier attempts kept in <id>@vN/)" if summary["redone"]
                         else ""))
        if last := summary["last_report"]:
            counts = last["counts"]
            console.print(f"last report: {last['uri']} ({counts['total']} entries, "
                          f"{counts.get('changed', 0)} changed, {counts.get('needs_review', 0)} need review)")
        if manifest:
            _status_plan(manifest, store, model)


def _follow(output: str, run_id: str | None, as_json: bool) -> None:
    """Print the parent run's state and progress as they change; exit 0 when it completed, 1 otherwise."""
    from flows.submit import follow, latest_run

    if run_id is None:
        run = latest_run(output)
        if run is None:
            raise ValueError(f"no bulk-edit run into {output} on this Prefect API (submit one with `run --submit`)")
        run_id = str(run.id)

    def show(status: dict) -> None:
        if as_json:
            typer.echo(json.dumps(status))
        else:
            percent = "" if status["progress_percent"] is None else f" {status['progress_percent']:.0f}%"
            console.print(f"{status['name']}: {status['state']}{percent}"
                          + (f" — {escape(status['message'])}" if status["message"] else ""), soft_wrap=True)

    final = follow(run_id, show)
    raise typer.Exit(0 if final["state"] == "COMPLETED" else 1)


def _status_plan(manifest: str, store, model: str | None) -> None:
    from imagic.batch.manifest import batch_model
    from imagic.batch.plan import plan

    entries, _ = _validate(manifest, None, None, model)
    planned = plan(entries, store, model=batch_model(entries, model))
    console.print(f"{manifest}: {len(planned.todo)} to do, {len(planned.done)} done, {len(planned.changed)} changed, "
                  f"{len(planned.failed)} failed and not retried")
    for entry, _, changes in planned.changed:
        console.print(f"  changed: {entry.id} ({', '.join(changes)}); redo with --redo changed", soft_wrap=True)


def _editor(model: str, device: str):
    """The model loaded once (a spinner while it loads), wrapped in the engine."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from imagic.engine.editor import Editor

    diffusers_logging.disable_progress_bar()  # the status spinner says it; tqdm would fight rich
    transformers_logging.disable_progress_bar()

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with console.status(f"loading {model} on {device}"):
        return Editor.from_pretrained(model, device)


def _safe_id(name: str) -> str | None:
    """An output folder's name as the entry id when it is a valid one (else one is generated)."""
    from imagic.batch.manifest import ID_PATTERN

    return name if ID_PATTERN.match(name) else None


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
def _batch_progress(entries: list, output: str):
    """A bar of the manifest's entries finished in the output store (polled: it works whether the
    entries run in this process or on a work pool). A store that cannot be listed shows no bar."""
    from imagic.io.storage import open_storage

    def state(keys: list[str]) -> tuple[set[str], set[str]]:  # (finished ids, ids whose latest attempt failed)
        attempts = scan(keys)
        return ({e for e, a in attempts.items() if a.finished},
                {e for e, a in attempts.items() if a.state == "failed"})

    try:
        store = open_storage(output)
    except Exception:
        yield
        return
    ids, stop, failed_before = {e.id for e in entries}, threading.Event(), None
    bar = Progress(TextColumn("[bold]entries"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                   TimeRemainingColumn(), console=console, transient=True)
    task = bar.add_task("entries", total=len(ids), note="")

    def watch() -> None:
        nonlocal failed_before
        while True:
            started = time.monotonic()
            try:
                finished, failed = state(store.list())
            except Exception:  # the store is the flow's business; the bar just waits
                finished = None
            if finished is not None:
                if failed_before is None:  # the first listing: what had failed before this run
                    failed_before = failed
                finished, failed = finished & ids, (failed & ids) - failed_before - finished
                bar.update(task, completed=len(finished | failed), note=f"{len(failed)} failed" if failed else "")
            # Every 2 s, but never more than 1/20 of the time in listings: a 100k batch's store has 1.4 M keys.
            if stop.wait(max(2.0, 20 * (time.monotonic() - started))):
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
        from imagic.batch.manifest import ManifestError
        from imagic.engine.images import ImageError
        from imagic.engine.errors import ModelError
        from imagic.io.storage import StorageError

        if isinstance(error, ManifestError) and len(error.problems) == 1:
            console.print(f"[red]error:[/] {escape(error.problems[0])}", soft_wrap=True)
            raise typer.Exit(2)
        if isinstance(error, ManifestError):  # every problem, one per line
            for problem in error.problems:
                console.print(escape(problem), soft_wrap=True)
            console.print(f"[red]{len(error.problems)} problems[/]")
            raise typer.Exit(2)
        if isinstance(error, ValidationError):
            details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
            console.print(f"[red]error:[/] invalid config: {escape(details)}", soft_wrap=True)
        elif isinstance(error, (ImageError, ModelError, StorageError, ValueError, OSError)):
            console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        else:
            return False
        raise typer.Exit(2)


if __name__ == "__main__":
    app()
