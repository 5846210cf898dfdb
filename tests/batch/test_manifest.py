import json
from pathlib import Path

import pytest

from imagic.batch.manifest import ManifestError, detect_format, entry_id, json_schema, parse_manifest, validate_manifest


def jsonl(*rows):
    return "\n".join(json.dumps(r) for r in rows) + "\n"


GOOD = {"id": "a", "image": "s3://bucket/images/a.png", "target_text": "a blue circle", "etas": [0.7, 1.0]}


def test_jsonl_with_defaults():
    text = jsonl({"defaults": {"etas": [0.5], "seeds": [0, 1], "preset": "community"}},
                 GOOD, {"image": "b.png", "target_text": "x"})
    entries = parse_manifest(text, "jsonl")
    assert [e.line for e in entries] == [2, 3]
    assert entries[0].etas == (0.7, 1.0) and entries[1].etas == (0.5,)
    assert entries[1].seeds == (0, 1) and entries[1].config.finetune_method == "full"
    assert entries[1].id.startswith("b-")


def test_every_problem_is_reported_with_its_line():
    text = jsonl(
        GOOD,
        {"id": "b", "image": "b.png", "target_text": "x", "etas": [3]},
        {"id": "../evil", "image": "c.png", "target_text": "x"},
        {"id": "a", "image": "d.png", "target_text": "x"},
        {"image": "ftp://host/x.png", "target_text": ""},
        {"image": "e.png", "target_text": "x", "overrides": {"finetune_steps": -1}},
    ) + "{not json\n"
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, "jsonl")
    problems = caught.value.problems
    assert "line 2: etas: must be a non-empty list of distinct numbers in [0, 2]" in problems
    assert any(p.startswith("line 3: id: must be") for p in problems)
    assert "line 4: id: 'a' duplicates line 1" in problems
    assert any(p.startswith("line 5: image: unsupported scheme") for p in problems)
    assert any(p.startswith("line 5: target_text") for p in problems)
    assert any(p.startswith("line 6: overrides: finetune_steps") for p in problems)
    assert any(p.startswith("line 7: invalid JSON") for p in problems)


@pytest.mark.parametrize("bad_id", ["a/b", "..", ".hidden", "tab\tid", "x" * 200, "ünï"])
def test_unsafe_ids(bad_id):
    with pytest.raises(ManifestError, match="line 1: id"):
        parse_manifest(jsonl({**GOOD, "id": bad_id}), "jsonl")


def test_csv_lists_and_rows():
    text = ("id,image,target_text,etas,seeds\n"
            "a,a.png,a blue circle,0.6;0.8,0 1\n"
            "b,b.png,a red square,\"[1.0, 1.2]\",\n"
            "c,c.png,x,lots,\n")
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, "csv")
    assert caught.value.problems == ["line 4: etas: must be a non-empty list of distinct numbers in [0, 2]"]
    entries = parse_manifest(text.rsplit("c,c.png", 1)[0], "csv")
    assert entries[0].etas == (0.6, 0.8) and entries[0].seeds == (0, 1) and entries[1].etas == (1.0, 1.2)


def test_yaml_reports_entry_lines():
    text = """defaults:
  etas: [0.7]
entries:
  - image: a.png
    target_text: a blue circle
  - image: b.png
    target_text: a red square
    seeds: [-1]
"""
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, "yaml")
    assert caught.value.problems[0].startswith("line 6: seeds:")
    entries = parse_manifest(text.replace("seeds: [-1]", "seeds: [3]"), "yaml")
    assert [e.line for e in entries] == [4, 6] and entries[1].seeds == (3,)


def test_command_line_preset_and_overrides_win():
    text = jsonl({"defaults": {"preset": "paper", "overrides": {"finetune_steps": 9}}}, GOOD)
    [entry] = parse_manifest(text, "jsonl", preset="fast", overrides={"embedding_steps": 3})
    assert entry.preset == "fast" and entry.config.finetune_steps == 9 and entry.config.embedding_steps == 3


def test_generated_ids_are_stable_and_safe():
    [a] = parse_manifest(jsonl({"image": "s3://bucket/dir/My Photo.JPG", "target_text": "x"}), "jsonl")
    [b] = parse_manifest(jsonl({"image": "s3://bucket/dir/My Photo.JPG", "target_text": "x"}), "jsonl")
    assert a.id == b.id and a.id.startswith("My-Photo-")
    assert a.id == entry_id(a.image, a.target_text, a.config, a.etas, a.seeds)


def test_empty_manifest_and_format_detection():
    with pytest.raises(ManifestError, match="no entries"):
        parse_manifest("\n", "jsonl")
    assert detect_format("m.yml") == "yaml" and detect_format("M.JSONL") == "jsonl"
    with pytest.raises(ManifestError, match="unknown manifest format"):
        detect_format("m.txt")


def test_shipped_example_manifest_is_valid():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "examples" / "manifest.jsonl").read_text()
    entries = parse_manifest(text, "jsonl")
    assert len(entries) >= 5 and all(Path(e.image).is_file() for e in entries)


def test_json_schema_names_the_fields():
    schema = json_schema()
    assert {"image", "target_text", "etas", "id"} <= set(schema["entry"]["properties"])


def test_lenient_validation_rejects_only_the_bad_entries():
    from imagic.batch.manifest import validate_manifest

    text = jsonl(GOOD, {"id": "b", "image": "b.png", "target_text": "x", "etas": [3]},
                 {"image": "c.png", "target_text": ""}) + "{oops\n"
    entries, rejected, file_problems = validate_manifest(text, "jsonl")
    assert [e.id for e in entries] == ["a"] and file_problems == []
    assert [(r.line, r.id) for r in rejected] == [(2, "b"), (3, "line-3@invalid"), (4, "line-4@invalid")]
    assert rejected[0].problems == ["line 2: etas: must be a non-empty list of distinct numbers in [0, 2]"]
    assert rejected[1].image == "c.png"


def test_the_published_schema_is_current_and_checks_what_validation_checks():
    import jsonschema

    schema = json_schema()
    published = Path(__file__).resolve().parents[2] / "docs" / "manifest.schema.json"
    assert json.loads(published.read_text()) == schema, "regenerate: imagic manifest schema > docs/manifest.schema.json"
    entry = jsonschema.Draft202012Validator(schema["entry"])
    assert entry.is_valid({"image": "a.png", "target_text": "x", "etas": [0.5, 2.0], "seeds": [0, 1]})
    for bad in ({"image": "a.png", "target_text": "x", "etas": [3]}, {"image": "a.png", "target_text": "x",
                "etas": []}, {"image": "a.png", "target_text": "x", "seeds": [1, 1]}, {"image": "a.png"},
                {"image": "a.png", "target_text": "x", "colour": "red"}):
        assert not entry.is_valid(bad), bad


@pytest.mark.parametrize("text, fmt, problem", [
    ('{"defaults": [1, 2]}\n{"image": "a.png", "target_text": "x"}', "jsonl", "defaults: must be a mapping"),
    ("defaults: [1]\nentries:\n  - {image: a.png, target_text: x}\n", "yaml", "defaults: must be a mapping"),
    ("base: &b\n  entries: []\n<<: *b\n", "yaml", "merge keys (<<) are not allowed"),
    ("entries:\n  - {image: a.png, target_text: x}\nentries:\n  - {image: b.png, target_text: y}\n", "yaml",
     "duplicate key 'entries' (first on line 1)"),
    ("entries:\n  - " + "[" * 5000 + "]" * 5000 + "\n", "yaml", "nested too deeply"),
])
def test_hostile_manifest_files_are_one_clear_file_problem(text, fmt, problem):
    """Each of these once raised a traceback (or, for the duplicate key, silently kept the last)."""
    _, _, problems = validate_manifest(text, fmt)
    assert len(problems) == 1 and problem in problems[0]


@pytest.mark.parametrize("row, problem", [
    ({"overrides": {"a": json.loads("[" * 20 + "1" + "]" * 20)}}, "nested deeper than 16 levels"),
    ({"target_text": "a \ud83d cat"}, "target_text: is not valid Unicode text"),
    ({"target_text": "a\x00cat"}, "target_text: contains control characters"),
    ({"overrides": {"embedding_steps": 10**9}}, "embedding_steps: 1000000000 is over the limit of 5000"),
    ({"etas": [i / 5000 for i in range(1000)], "seeds": list(range(100))}, "etas × seeds: 100000 is over the limit"),
    ({"overrides": {"train_batch_size": 10**6}}, "train_batch_size: 1000000 is over the limit of 64"),
])
def test_hostile_entries_are_rejected_alone(row, problem):
    text = jsonl(GOOD, {"id": "bad", "image": "b.png", "target_text": "x", **row})
    entries, rejected, file_problems = validate_manifest(text, "jsonl")
    assert [e.id for e in entries] == ["a"] and not file_problems
    assert len(rejected) == 1 and problem in rejected[0].problems[0]


def test_a_100k_deep_json_line_is_rejected_alone():
    deep = '{"image": "a.png", "target_text": "x", "overrides": ' + "[" * 100_000 + "]" * 100_000 + "}"
    entries, rejected, _ = validate_manifest(jsonl(GOOD) + deep + "\n", "jsonl")
    assert [e.id for e in entries] == ["a"] and "nested deeper than 16 levels" in rejected[0].problems[0]


def test_a_rejected_line_never_takes_a_real_entrys_folder():
    text = jsonl({"id": "line-2@invalid", "image": "a.png", "target_text": "x"},
                 {"image": "a.png", "target_text": "x", "etas": [9]})
    entries, rejected, _ = validate_manifest(text, "jsonl")
    assert not entries and [r.id for r in rejected] == ["line-1@invalid", "line-2@invalid"]
    assert "id: must be 1-128 characters" in rejected[0].problems[0]


def test_an_id_never_carries_a_credential_and_survives_re_signing():
    bare, signed = parse_manifest(jsonl(
        {"image": "http://user:secret@10.0.0.1:8080", "target_text": "x"},
        {"image": "https://bucket.s3.amazonaws.com/a/cat.png?X-Amz-Date=20261201T000000Z&X-Amz-Expires=3600"
                  "&X-Amz-Signature=abc", "target_text": "x"}), "jsonl")
    [re_signed] = parse_manifest(jsonl(  # the same object, signed again two days later
        {"image": "https://bucket.s3.amazonaws.com/a/cat.png?X-Amz-Date=20261203T120000Z&X-Amz-Expires=600"
                  "&X-Amz-Signature=def", "target_text": "x"}), "jsonl")
    assert "secret" not in bare.id and "user" not in bare.id and bare.id.startswith("10-0-0-")
    assert signed.id == re_signed.id and signed.id.startswith("cat-")


def test_a_byte_order_mark_is_not_part_of_the_first_field():
    assert [e.id for e in parse_manifest("\ufeff" + jsonl(GOOD), "jsonl")] == ["a"]
    csv = "\ufeffid,image,target_text\na,s3://bucket/a.png,a blue circle\n"
    assert [e.target_text for e in parse_manifest(csv, "csv")] == ["a blue circle"]


def test_a_seed_beyond_int64_is_rejected_before_any_work():
    entries, rejected, _ = validate_manifest(jsonl({**GOOD, "seeds": [2**63]}, {**GOOD, "id": "b", "seeds": [2**63 - 1]}),
                                             "jsonl")
    assert [e.id for e in entries] == ["b"] and "seeds" in rejected[0].problems[0]


def test_yaml_aliases_that_expand_past_the_limit_are_one_file_problem():
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "\n".join(levels) + "\nentries:\n  - {image: s3://b/a.png, target_text: t, etas: *a8}\n"
    _, _, problems = validate_manifest(text, "yaml")  # 9⁹ ≈ 387 M nodes once expanded
    assert len(problems) == 1 and "expand to" in problems[0] and "over the limit" in problems[0]
    _, _, problems = validate_manifest("entries: &e [*e]\n", "yaml")
    assert problems == ["YAML aliases refer to themselves"]
