"""The layering rules of ../shared/DESIGN.md, as tests: what the engine may import, no import circles, small
modules, one table of built-in models, one record schema, settings passed in."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("imagic", "flows")
MODULES = sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py"))
# What the engine must never pull in itself: the batch and storage layers, orchestration, serialisation.
NOT_IN_ENGINE = ("boto3", "botocore", "prefect", "yaml", "pyarrow", "typer")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_imports(path: Path) -> set[str]:
    """Every name `path` imports (`module`, and `module.name` for `from module import name`), at module level
    or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def imports(path: Path) -> set[str]:
    """Every imagic/flows module `path` imports."""
    known = {module_name(p) for p in MODULES}
    return {name for name in all_imports(path) if name in known and name.split(".")[0] in PACKAGES}


def test_importing_the_engine_loads_no_batch_io_or_orchestration_code():
    """In a fresh interpreter: every engine module imported after its own dependencies (torch, diffusers,
    transformers, peft — diffusers itself brings yaml and boto3 along); what the engine adds is its own."""
    engine = [module_name(p) for p in MODULES if p.parts[-2] == "engine" and p.name != "__init__.py"]
    script = f"""
import json, sys
import torch, diffusers, transformers, peft, safetensors
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, IFPipeline
before = set(sys.modules)
for name in {engine!r}:
    __import__(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""
    added = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                                      cwd=REPO).stdout)
    assert len(engine) >= 15 and "imagic.engine.editor" in added
    assert not [m for m in added if m.split(".")[0] in NOT_IN_ENGINE], added
    assert not [m for m in added if m.startswith(("imagic.batch", "imagic.io", "flows"))], added
    # … and no engine module names one of them itself, even inside a function (diffusers' own imports aside).
    named = [(path.name, name) for path in MODULES if path.parts[-2] == "engine" for name in all_imports(path)
             if name.split(".")[0] in NOT_IN_ENGINE]
    assert not named


def test_the_light_layers_answer_without_torch():
    """`imagic --help`, manifest validation, planning and the record's layout never import torch."""
    script = """
import sys
import imagic.cli, imagic.batch.manifest, imagic.batch.plan, imagic.batch.outputs, imagic.batch.report
import imagic.engine.config, imagic.engine.builtins, imagic.engine.grid, imagic.engine.errors
print("torch" in sys.modules, "diffusers" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


def test_no_import_circles():
    graph = {module_name(path): imports(path) for path in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                pytest.fail("import circle: " + " → ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_layers_import_only_downwards():
    """engine ← io ← batch ← flows ← cli. The one exception is named: an s3:// model name is synced by
    the storage layer, imported inside that one function so that importing the engine stays free of it."""
    layer = {"imagic.engine": 0, "imagic.toy": 0, "imagic.io": 1, "imagic.batch": 2, "flows": 3, "imagic.cli": 4}

    def level(name: str) -> int | None:
        return next((v for k, v in layer.items() if name == k or name.startswith(k + ".")), None)

    upward = sorted((module_name(path), target) for path in MODULES for target in imports(path)
                    if level(module_name(path)) is not None and level(target) is not None
                    and level(target) > level(module_name(path)))
    assert upward == [("imagic.engine.loading", "imagic.io.models")]


def test_no_module_over_500_lines():
    files = MODULES + sorted((REPO / "tests").rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_built_in_model_names_live_in_one_table():
    """A name of the table written anywhere else in the package would be a second home that can drift."""
    from imagic.engine.builtins import BUILTIN_MODELS

    home = REPO / "imagic" / "engine" / "builtins.py"
    elsewhere = [f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}" for path in MODULES if path != home
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Constant) and node.value in BUILTIN_MODELS]
    assert not elsewhere


def test_every_reader_of_the_table_sees_a_new_built_in(monkeypatch):
    """Config (its family), loading (where it comes from), the CLI (its help) and the batch (toy metrics)."""
    from typer.testing import CliRunner

    from imagic.batch.manifest import single_entry
    from imagic.cli import app
    from imagic.engine import builtins
    from imagic.engine.loading import resolve_model

    new = builtins.BuiltinModel("toy-if-2", "cascade", "a second toy cascade", package_folder="toy/cascade",
                                training_script="train_cascade", oracle=True)
    monkeypatch.setitem(builtins.BUILTIN_MODELS, new.name, new)
    assert builtins.model_family("toy-if-2") == "cascade" and builtins.has_oracle("toy-if-2")
    assert single_entry("a.png", "a red circle", model="toy-if-2").config.sr_noise_level == 250
    assert resolve_model("toy-if-2") == resolve_model("toy-if")  # the same shipped folders
    assert builtins.model_family("tiny-xl") == "single" and not builtins.has_oracle("tiny")
    assert "tiny-xl" in CliRunner().invoke(app, ["edit", "--help"], terminal_width=200).output


def test_one_record_schema_version():
    """One SCHEMA_VERSION, in the module of the records and the layout, shared by record, error and report."""
    from imagic.batch.outputs import SCHEMA_VERSION, failure_record
    from imagic.batch.report import batch_report

    defined = [f"{path.relative_to(REPO)}" for path in MODULES for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SCHEMA_VERSION" for t in node.targets)]
    assert defined == ["imagic/batch/outputs.py"]
    error = failure_record(entry_id="a", line=1, input_uri="a.png", target_text="x", reason="r", message="m")
    assert error["schema_version"] == batch_report("b", [error], seconds=0.0)["schema_version"] == SCHEMA_VERSION


def test_settings_are_passed_in_not_read_inside_library_functions():
    """Only a process's edge (a CLI command, a flow run) builds Settings from the environment; the library takes
    them as an argument. The environment is read directly in two places only: the model cache's location
    (like HF_HOME) and the S3 endpoint (boto3's own variable, which decides the addressing style)."""
    library = [p for p in MODULES if p.parts[len(REPO.parts)] == "imagic" and p.name != "cli.py"]
    built = [f"{p.relative_to(REPO)}:{node.lineno}" for p in library for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr == "from_env" and getattr(node.func.value, "id", "") == "Settings"]
    assert not built
    environ = sorted(str(p.relative_to(REPO)) for p in library if "os.environ" in p.read_text()
                     or "getenv" in p.read_text())
    assert environ == ["imagic/engine/cache.py", "imagic/io/storage.py"]
