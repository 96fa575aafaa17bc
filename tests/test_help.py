"""Every subcommand's --help shows examples, and they run; --dim states its default."""

from __future__ import annotations

import shlex

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from tests.builders import keras_mlp

COMMANDS = sorted(main.commands)


def help_of(command: str) -> str:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    return result.stdout


def examples(command: str) -> list[str]:
    lines = help_of(command).splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() in ("Example:", "Examples:"))
    found = []
    for line in lines[start + 1:]:
        if not line.startswith("    bnfold "):
            break
        found.append(line.split("  #")[0].strip())
    return found


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_has_an_example(command):
    found = examples(command)
    assert found and all(e.startswith(f"bnfold {command} ") for e in found)


def test_help_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = keras_mlp(dense="gemm")
    for node in model.graph.node:  # the names the examples use
        node.name = {"dense2": "dense_2"}.get(node.name, node.name)
    onnx.save(model, "model.onnx")
    np.savez("data.npz", x=np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32))
    for command in ["fold", "verify", "inspect", "insert"]:  # artifacts: the training env's
        for example in examples(command):
            args = shlex.split(example)[1:]
            result = CliRunner().invoke(main, args)  # its BN folds: --strict passes too
            assert result.exit_code == 0, (example, result.output)
    # calibrate's examples: on the model with batch norms the insert example wrote
    data = np.random.default_rng(1).standard_normal((64, 5)).astype(np.float32)
    np.savez("samples.npz", x=data)
    (tmp_path / "samples").mkdir()
    np.savez("samples/part1.npz", x=data[:32])
    np.savez("samples/part2.npz", x=data[32:])
    for example in examples("calibrate"):
        result = CliRunner().invoke(main, shlex.split(example)[1:])
        assert result.exit_code == 0, (example, result.output)


@pytest.mark.parametrize("command", ["fold", "verify"])
def test_dim_states_its_default(command):
    text = " ".join(help_of(command).split())
    assert "--dim NAME=VALUE" in text
    assert ("[default: draw 1, distinct primes 2, 3, 5, ... that no dimension of the model has; "
            "draw 2, 1]") in text


def test_after_mentions_positions():
    assert "'#N': the N-th layer in graph order" in " ".join(help_of("insert").split())
