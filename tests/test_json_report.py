"""The JSON a pipeline relies on: every command's report matches docs/report.schema.json (checked
by a small validator for the subset of JSON Schema the file uses, and by `jsonschema` when it is
installed), `--json -` is stdout for every command, docs/JSON.md's example is a valid report."""

from __future__ import annotations

import json
import os
import re

import onnx
import onnxruntime
import pytest
from click.testing import CliRunner

import bnfold
from bnfold.cli import main
from tests.builders import conv_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = json.load(open(os.path.join(ROOT, "docs", "report.schema.json")))

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def errors(value, schema, root=SCHEMA, where="$") -> list[str]:
    """Where `value` breaks `schema`: type, const, enum, required, properties,
    additionalProperties, items, minimum, $ref (local), allOf, anyOf, if/then/else."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return errors(value, target, root, where)
    found = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is(value, t) for t in types):
            return [f"{where}: {value!r} is not {types}"]
    if "const" in schema and value != schema["const"]:
        found.append(f"{where}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        found.append(f"{where}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        found += [f"{where}: no {key}" for key in schema.get("required", []) if key not in value]
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                found += errors(item, properties[key], root, f"{where}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                found += errors(item, schema["additionalProperties"], root, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += errors(item, schema["items"], root, f"{where}[{i}]")
    for sub in schema.get("allOf", []):
        found += errors(value, sub, root, where)
    if "anyOf" in schema and all(errors(value, sub, root, where) for sub in schema["anyOf"]):
        found.append(f"{where}: matches none of anyOf")
    if "if" in schema:
        branch = "else" if errors(value, schema["if"], root, where) else "then"
        found += errors(value, schema.get(branch, {}), root, where)
    return found


def _is(value, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def assert_valid(report: dict) -> None:
    problems = errors(report, SCHEMA)
    assert not problems, problems
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(report, SCHEMA)


def test_the_validator_catches_what_the_schema_forbids():
    good = {"schema_version": 1, "command": "inspect", "versions": {
        "bnfold": "0", "onnx": "1", "onnxruntime": "2"}, "input": "m.onnx", "output": None,
        "timings": {"total": 0.1}, "layers": [], "batchnorms": []}
    assert errors(good, SCHEMA) == []
    assert errors({**good, "schema_version": 2}, SCHEMA)
    assert errors({**good, "command": "nope"}, SCHEMA)
    assert errors({k: v for k, v in good.items() if k != "versions"}, SCHEMA)
    assert errors({**good, "timings": {"total": -1}}, SCHEMA)
    assert errors({**good, "layers": None}, SCHEMA)  # inspect's own part
    assert errors({**good, "command": "fold"}, SCHEMA)  # a fold report needs fold's fields


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(), str(path))
    return path


def json_of(args) -> dict:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_fold_report_has_versions_paths_timings_and_the_checks_figures(model, tmp_path):
    out = tmp_path / "f.onnx"
    report = json_of(["fold", model, "-o", out, "--json", "-"])
    assert_valid(report)
    assert report["schema_version"] == 1 and report["command"] == "fold"
    assert report["versions"] == {"bnfold": bnfold.__version__, "onnx": onnx.__version__,
                                  "onnxruntime": onnxruntime.__version__}
    assert report["input"] == str(model) and report["output"] == str(out)
    timings = report["timings"]
    assert set(timings) == {"load", "fold", "save", "check", "total"}
    assert all(t > 0 for t in timings.values())
    assert sum(timings[s] for s in ("load", "fold", "save", "check")) <= timings["total"]
    (output,) = report["verification"]["outputs"]
    assert output["passed"] and isinstance(output["max_abs"], float)


def test_dry_run_and_no_verify_say_which_steps_did_not_run(model, tmp_path):
    report = json_of(["fold", model, "--dry-run", "--json", "-"])
    assert_valid(report)
    assert report["output"] is None and report["timings"]["save"] is None
    report = json_of(["fold", model, "-o", tmp_path / "f.onnx", "--no-verify", "--json", "-"])
    assert_valid(report)
    assert report["timings"]["check"] is None and report["verification"] is None


def test_every_command_writes_json_to_stdout_with_dash(model, tmp_path):
    json_of(["fold", model, "-o", tmp_path / "f.onnx", "--json", "-"])
    gemm = tmp_path / "gemm.onnx"
    onnx.save(onnx.load(os.path.join(ROOT, "models", "mlp_keras.onnx")), str(gemm))
    reports = {
        "verify": json_of(["verify", model, tmp_path / "f.onnx", "--json", "-"]),
        "inspect": json_of(["inspect", model, "--json", "-"]),
        "insert": json_of(["insert", gemm, "-o", tmp_path / "i.onnx", "--all", "--json", "-"]),
    }
    for command, report in reports.items():
        assert report["command"] == command
        assert_valid(report)
    assert reports["verify"]["candidate"] == str(tmp_path / "f.onnx")
    assert set(reports["insert"]["timings"]) == {"load", "insert", "save", "check", "total"}


def test_json_file_is_the_same_report(model, tmp_path):
    result = CliRunner().invoke(main, [str(a) for a in [
        "fold", model, "-o", tmp_path / "f.onnx", "--json", tmp_path / "r.json", "-q"]])
    assert result.exit_code == 0 and result.output == ""
    assert_valid(json.loads((tmp_path / "r.json").read_text()))


def test_docs_example_is_a_valid_report_and_names_every_top_level_field(model, tmp_path):
    text = open(os.path.join(ROOT, "docs", "JSON.md")).read()
    example = json.loads(re.search(r"```json\n(.*?)```", text, re.S)[1])
    assert_valid(example)
    report = json_of(["fold", model, "-o", tmp_path / "f.onnx", "--json", "-"])
    assert set(example) == set(report)
    for field in report:
        assert f"`{field}`" in text, f"docs/JSON.md does not describe {field}"
