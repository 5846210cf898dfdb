"""Manifests: which images to edit towards which texts, validated in full before any GPU work.

Formats: JSONL (an optional first line `{"defaults": {...}}`), CSV (header row; list cells as `0.6;0.7`,
`0.6 0.7` or JSON), YAML (`defaults:` and `entries:`). Every problem is reported at once, with its line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imagic.batch.outputs import attempt_folder, staged_manifest_key
from imagic.batch.settings import Settings
from imagic.engine.builtins import DEFAULT_MODEL
from imagic.engine.config import DEFAULT_PRESET, PRESETS, EditConfig, make_config
from imagic.engine.grid import DEFAULT_ETAS, DEFAULT_SEEDS, GRID_MESSAGES, Etas, Seeds
from imagic.io.inputs import DEFAULT_TIMEOUT_S, read_uri
from imagic.io.redaction import redact_uri, uri_identity
from imagic.io.storage import Storage

Format = Literal["jsonl", "csv", "yaml"]
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
IMAGE_SCHEMES = ("s3://", "file://", "http://", "https://")


MAX_MANIFEST_BYTES = 64 * 2**20  # a million entries is ~150 MB of JSONL; 64 MB is far past any single batch
MAX_DEPTH = 16  # the deepest a manifest needs is ~3 (defaults → overrides → a list)
# Nodes a YAML manifest may expand to through its aliases: ~10 an entry of a 100k-entry batch, and far below
# what a "billion laughs" file (aliases of aliases, ×9 a level) asks for.
MAX_YAML_NODES = 4_000_000


class ManifestError(ValueError):
    """Every problem in a manifest, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in manifest:\n" + "\n".join(problems))


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    etas: Etas | None = None  # the rules live in imagic/engine/grid.py
    seeds: Seeds | None = None
    preset: str | None = Field(None, json_schema_extra={"examples": list(PRESETS)})
    overrides: dict[str, Any] = Field(default_factory=dict, description="EditConfig fields, e.g. finetune_steps")


class Defaults(_Common):
    """File-level defaults; each entry may override them."""

    model: str | None = None


class EntrySpec(_Common):
    """One manifest entry as written."""

    id: str | None = None
    image: str
    target_text: str
    source_text: str | None = None  # optional description of the input; informational

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str | None) -> str | None:
        if value is not None and (not ID_PATTERN.match(value) or value in (".", "..")):
            raise ValueError("must be 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit "
                             "(it names the entry's output folder)")
        return value

    @field_validator("image")
    @classmethod
    def _image_uri(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        if "://" in value and not value.startswith(IMAGE_SCHEMES):
            raise ValueError(f"unsupported scheme in {redact_uri(value)!r}; use a path, {', '.join(IMAGE_SCHEMES)}")
        if value.startswith("s3://") and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+", value):
            raise ValueError(f"{redact_uri(value)!r} is not s3://bucket/key")
        if any(ord(c) < 32 for c in value):
            raise ValueError("contains control characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("is not valid Unicode text (a lone surrogate)") from None
        return value

    @field_validator("target_text")
    @classmethod
    def _text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("is not valid Unicode text (a lone surrogate, e.g. from a broken \\ud83d escape)") from None
        if any(ord(c) < 32 and c not in "\t\n" for c in value):
            raise ValueError("contains control characters")
        return value.strip()


class Entry(BaseModel):
    """An entry with defaults applied and its config resolved: everything an edit needs."""

    model_config = ConfigDict(frozen=True)

    id: str
    line: int
    image: str
    target_text: str
    etas: tuple[float, ...]
    seeds: tuple[int, ...]
    preset: str
    config: EditConfig
    model: str | None = None  # the file's default model; a run's --model beats it
    attempt: int = 1  # which attempt folder the edit writes (imagic/batch/outputs.py); set by the batch's plan

    @property
    def folder(self) -> str:
        return attempt_folder(self.id, self.attempt)


def entry_id(image: str, target_text: str, config: EditConfig, etas, seeds) -> str:
    """A stable id for an entry without one: the same work always gets the same id (and output folder)."""
    image = uri_identity(image)  # never a credential in an id, a folder or a key; a re-signed URL keeps its id
    key = json.dumps([image, target_text, config.model_dump(mode="json"), list(etas), list(seeds)], sort_keys=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "-", PurePosixPath(image.split("://")[-1]).stem).strip("-")[:40] or "entry"
    return f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def detect_format(name: str) -> Format:
    suffix = name.lower().rsplit(".", 1)[-1]
    formats = {"jsonl": "jsonl", "ndjson": "jsonl", "csv": "csv", "yaml": "yaml", "yml": "yaml"}
    if suffix not in formats:
        raise ManifestError([f"{name}: unknown manifest format; use .jsonl, .csv or .yaml"])
    return formats[suffix]


class Rejected(BaseModel):
    """An entry that failed validation: it gets an error record; the rest of the batch still runs."""

    line: int
    id: str
    image: str | None = None
    target_text: str | None = None
    problems: list[str]


def validate_manifest(text: str, fmt: Format, *, preset: str | None = None, overrides: dict | None = None,
                      default_preset: str = DEFAULT_PRESET, settings: Settings | None = None,
                      model: str | None = None) -> tuple[list[Entry], list[Rejected], list[str]]:
    """(valid entries, rejected entries, file-level problems). `preset`/`overrides`/`model` beat the file's
    own (the model decides which family's presets apply); `settings` (default: the built-in ones) bound
    what one entry may cost."""
    settings = settings or Settings.defaults()
    text = text.removeprefix("\ufeff")  # the byte-order mark Excel writes at the start of a CSV
    file_problems: list[str] = []
    line_problems: dict[int, list[str]] = {}
    if len(text.encode("utf-8", "surrogatepass")) > MAX_MANIFEST_BYTES:
        return [], [], [f"manifest is over {MAX_MANIFEST_BYTES // 2**20} MB: split it into several batches"]
    try:
        defaults_data, rows = _READERS[fmt](text, file_problems, line_problems)
    except RecursionError:
        return [], [], [f"manifest is nested too deeply (a manifest needs at most {MAX_DEPTH} levels)"]
    rows = [(line, data) for line, data in rows if not _too_deep(data, line, line_problems)]
    defaults = Defaults()
    if defaults_data is not None and not isinstance(defaults_data, dict):
        file_problems.append("defaults: must be a mapping of field: value")
    elif _depth(defaults_data) > MAX_DEPTH:
        file_problems.append(f"defaults: nested deeper than {MAX_DEPTH} levels")
    else:
        try:
            defaults = Defaults(**(defaults_data or {}))
        except ValidationError as err:
            file_problems += _messages(err, "defaults")

    entries: list[Entry] = []
    raw: dict[int, dict] = {}
    seen: dict[str, int] = {}
    for line, data in rows:
        raw[line] = data if isinstance(data, dict) else {}
        result = _resolve(line, data, defaults, preset, overrides, default_preset, settings,
                          model or defaults.model or DEFAULT_MODEL)
        if isinstance(result, list):
            line_problems[line] = result
        elif result.id in seen:
            line_problems[line] = [f"line {line}: id: {result.id!r} duplicates line {seen[result.id]}"]
        else:
            seen[result.id] = line
            entries.append(result)
    if not rows and not line_problems and not file_problems:
        file_problems.append("manifest has no entries")

    rejected = []
    for line, problems in sorted(line_problems.items()):
        data = raw.get(line, {})
        given = data.get("id")
        safe = isinstance(given, str) and ID_PATTERN.match(given) and given not in seen
        rejected.append(Rejected(
            # `@` is in no valid id, so a rejected line's folder never is a real entry's (whose finished folder
            # once received an invalid line's error.json)
            line=line, id=given if safe else f"line-{line}@invalid", problems=[_clean(p) for p in problems],
            image=_clean(data.get("image")) if isinstance(data.get("image"), str) else None,
            target_text=_clean(data.get("target_text")) if isinstance(data.get("target_text"), str) else None,
        ))
    return entries, rejected, file_problems


def read_manifest_text(uri: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """A manifest's text, read like any input but bounded by MAX_MANIFEST_BYTES; not UTF-8 is one problem."""
    data = read_uri(uri, max_bytes=MAX_MANIFEST_BYTES, timeout_s=timeout_s)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError([f"{redact_uri(uri)}: not UTF-8 text ({err.reason} at byte {err.start})"]) from None


def runnable(entries: list[Entry], rejected: list[Rejected], file_problems: list[str]) -> list[Entry]:
    """The entries a batch runs. A bad entry gets an error record and the rest run; a bad file, or one with
    no valid entry at all, raises ManifestError listing every problem with its line."""
    if file_problems or not entries:
        raise ManifestError(file_problems + [p for r in rejected for p in r.problems])
    return entries


def entries_jsonl(entries: list[Entry]) -> bytes:
    """Validated entries, one JSON object a line: what a chunk run reads instead of the whole manifest."""
    return "".join(entry.model_dump_json() + "\n" for entry in entries).encode()


def read_entries_jsonl(data: bytes) -> list[Entry]:
    """Entries written by `entries_jsonl` (already validated: only their types are checked again)."""
    return [Entry.model_validate_json(line) for line in data.decode().splitlines() if line]


def stage_manifest(store: Storage, manifest_uri: str, text: str) -> str:
    """The manifest where every pod of a batch can read it: an s3:// one stays where it is; any other is copied
    into the output store once per content (a pod cannot read the caller's disk, and an http(s) URL may carry a
    signature that must not become a flow-run parameter); a later run that finds other content gets a new
    copy. Returns its URI."""
    if manifest_uri.startswith("s3://"):
        return manifest_uri
    key = staged_manifest_key(manifest_uri, text)
    store.write_bytes(key, text.encode("utf-8"), if_absent=True)
    return store.url_for(key)


def batch_model(entries: list[Entry], model: str | None = None) -> str:
    """The model a run of these entries uses: the run's, else the manifest's default, else the toy model."""
    return model or entries[0].model or DEFAULT_MODEL


def parse_manifest(text: str, fmt: Format, *, preset: str | None = None, overrides: dict | None = None,
                   default_preset: str = DEFAULT_PRESET, model: str | None = None,
                   settings: Settings | None = None) -> list[Entry]:
    """Validate a whole manifest strictly: any problem raises ManifestError listing all of them."""
    entries, rejected, file_problems = validate_manifest(text, fmt, preset=preset, overrides=overrides,
                                                         default_preset=default_preset, model=model,
                                                         settings=settings)
    problems = file_problems + [p for r in rejected for p in r.problems]
    if problems:
        raise ManifestError(problems)
    return entries


def single_entry(image: str, target_text: str, *, etas=None, seeds=None, preset: str = DEFAULT_PRESET,
                 overrides: dict | None = None, entry_id: str | None = None, model: str | None = None,
                 settings: Settings | None = None) -> Entry:
    """One entry from command-line arguments, validated by the same rules as a manifest line."""
    data = {"image": image, "target_text": target_text, "preset": preset, "overrides": overrides or {}}
    data.update({k: v for k, v in (("etas", etas), ("seeds", seeds), ("id", entry_id)) if v is not None})
    result = _resolve(1, data, Defaults(), None, None, preset, settings or Settings.defaults(), model or DEFAULT_MODEL)
    if isinstance(result, list):
        raise ManifestError([problem.removeprefix("line 1: ") for problem in result])
    return result


def _resolve(line: int, data, defaults: Defaults, preset, overrides, default_preset,
             settings: Settings, model: str = DEFAULT_MODEL) -> Entry | list[str]:
    """One row → an Entry, or its problems."""
    try:
        spec = EntrySpec(**data)
    except ValidationError as err:
        return _messages(err, f"line {line}")
    except TypeError:
        return [f"line {line}: must be an object with image and target_text"]
    chosen_preset = preset or spec.preset or defaults.preset or default_preset
    try:
        merged = {**defaults.overrides, **spec.overrides, **(overrides or {})}
        config = _shared_config(chosen_preset, model, repr(sorted(merged.items())), merged)
    except ValidationError as err:
        return _messages(err, f"line {line}: overrides")
    except ValueError as err:
        return [f"line {line}: preset: {err}"]
    etas = tuple(spec.etas or defaults.etas or DEFAULT_ETAS)
    seeds = tuple(spec.seeds or defaults.seeds or DEFAULT_SEEDS)
    if over := settings.budget_problems(config, etas, seeds):
        return [f"line {line}: {problem}" for problem in over]
    eid = spec.id or entry_id(spec.image, spec.target_text, config, etas, seeds)
    return Entry(id=eid, line=line, image=spec.image, target_text=spec.target_text, etas=etas, seeds=seeds,
                 preset=chosen_preset, config=config, model=defaults.model)


def _shared_config(preset: str, model: str, key: str, overrides: dict) -> EditConfig:
    """One frozen EditConfig for every entry that asks the same (`key`: the overrides' repr): a 100k-entry
    manifest of one preset holds one config, not 100k."""
    cache_key = (preset, model, key)
    if cache_key not in _CONFIGS:
        if len(_CONFIGS) >= 1024:
            _CONFIGS.clear()
        _CONFIGS[cache_key] = make_config(preset, model=model, **overrides)
    return _CONFIGS[cache_key]


_CONFIGS: dict[tuple, EditConfig] = {}


def _clean(text: str, limit: int = 1000) -> str:
    """Text from a rejected line, safe to write anywhere: valid UTF-8 (lone surrogates become '?'), bounded."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"


def _depth(value, level: int = 0) -> int:
    """How deeply `value` nests (iteratively: a hostile file must not exhaust the stack here either)."""
    deepest, stack = level, [(value, level)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH and isinstance(item, dict | list):
            stack += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _too_deep(data, line: int, line_problems: dict[int, list[str]]) -> bool:
    if _depth(data) > MAX_DEPTH:
        line_problems[line] = [f"line {line}: nested deeper than {MAX_DEPTH} levels"]
        return True
    return False


def _messages(err: ValidationError, where: str) -> list[str]:
    out = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "entry"
        message = e["msg"].removeprefix("Value error, ")
        if field in GRID_MESSAGES:  # one message per field, not one per list item
            message = GRID_MESSAGES[field]
        out.append(f"{where}: {field}: {message}")
    return list(dict.fromkeys(out))


def _read_jsonl(text: str, problems: list[str], line_problems: dict[int, list[str]]):
    defaults, rows = None, []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            line_problems[number] = [f"line {number}: invalid JSON ({err.msg})"]
            continue
        except RecursionError:
            line_problems[number] = [f"line {number}: nested deeper than {MAX_DEPTH} levels"]
            continue
        if isinstance(data, dict) and set(data) == {"defaults"} and not rows and defaults is None:
            defaults = data["defaults"]
        else:
            rows.append((number, data))
    return defaults, rows


def _read_csv(text: str, problems: list[str], line_problems: dict[int, list[str]]):
    rows = []
    reader = csv.DictReader(io.StringIO(text))
    for data in reader:
        number = reader.line_num
        if None in data:
            line_problems[number] = [f"line {number}: more cells than header columns"]
            continue
        row: dict[str, Any] = {k.strip(): v.strip() for k, v in data.items() if k and v is not None and v.strip()}
        for key in ("etas", "seeds"):
            if key in row:
                row[key] = _csv_list(row[key])
        if "overrides" in row:
            try:
                row["overrides"] = json.loads(row["overrides"])
            except json.JSONDecodeError:
                line_problems[number] = [f"line {number}: overrides: must be a JSON object"]
                continue
        rows.append((number, row))
    return None, rows


def _csv_list(cell: str) -> Any:
    if cell.startswith("["):
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell
    parts = [p for p in re.split(r"[;\s,]+", cell) if p]
    try:
        return [float(p) if any(c in p for c in ".eE") else int(p) for p in parts]
    except ValueError:
        return cell  # let validation name the field


class _StrictLoader(yaml.SafeLoader):
    """YAML without the surprises: a duplicated key is an error, not the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(None, None, "merge keys (<<) are not allowed in a manifest",
                                                        key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, problems: list[str], line_problems: dict[int, list[str]]):
    try:
        root = yaml.compose(text, Loader=_StrictLoader)
        if (nodes := _expanded_nodes(root)) is None or nodes > MAX_YAML_NODES:
            problems.append("YAML aliases refer to themselves" if nodes is None else
                            f"YAML aliases expand to {nodes:,} nodes, over the limit of {MAX_YAML_NODES:,}: "
                            "write the entries out")
            return None, []
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as err:
        problems.append(f"invalid YAML: {' '.join(str(err).split())}")
        return None, []
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        problems.append("YAML manifest must be a mapping with an `entries:` list (and optional `defaults:`)")
        return None, []
    entries_node = next(value for key, value in root.value if key.value == "entries")
    lines = [node.start_mark.line + 1 for node in entries_node.value]
    return data.get("defaults"), list(zip(lines, data["entries"]))


def _expanded_nodes(root) -> int | None:
    """How many nodes a composed YAML document has once its aliases are expanded, counted without expanding
    them: each distinct node once, its size the sum of its children's (linear in the file, not the expansion).
    None when an alias refers to a node it is inside of (an endless expansion)."""
    if root is None:
        return 0
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # counted once their children are
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if not children_done:
            if id(node) in open_nodes:
                return None
            open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        if children_done:
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
        else:
            stack.append((node, True))
            stack += [(child, False) for child in children if id(child) not in sizes]
    return sizes[id(root)]


_READERS = {"jsonl": _read_jsonl, "csv": _read_csv, "yaml": _read_yaml}


def json_schema() -> dict:
    """JSON Schema of one entry and of the defaults, for the docs."""
    return {"entry": EntrySpec.model_json_schema(), "defaults": Defaults.model_json_schema()}
