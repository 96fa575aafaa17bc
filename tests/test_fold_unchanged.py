"""Models with nothing to fold come back exactly as they were ("nothing to fold" in the report,
`changed` False; the CLI writes a byte copy without running a check), and models of opset
1..6 are passed through, or converted to opset 7 when they have batch norms to fold."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bnfold.cli import main
from bnfold.fold import fold, upgrade
from builders import (
    GraphBuilder,
    act_bn_tail,
    count_ops,
    keras_conv_chain,
    noop_cast,
    noop_casts,
    random_feeds,
    run_model,
    trained_bn_params,
)


def relu_mlp() -> onnx.ModelProto:
    """x -> Cast(no-op) -> MatMul -> Relu -> y: no batch norm at all."""
    b = GraphBuilder(seed=0)
    x = noop_cast(b, b.input("x", ["batch", 4]), "cast_in")
    y = b.node("MatMul", [x, b.weight("W", [4, 6])], name="matmul")
    b.node("Relu", [y], name="relu", outputs=["y"])
    b.output("y")
    return b.build()


@pytest.mark.parametrize("inplace", [False, True])
def test_model_without_batch_norm_is_returned_exactly_as_it_was(inplace):
    model = relu_mlp()
    assert noop_casts(model) == 1
    before = model.SerializeToString()
    folded, report = fold(model, inplace=inplace)
    assert folded.SerializeToString() == before  # the no-op Cast and value_info stay too
    assert not report.changed and report.removed_casts == 0
    assert "nothing to fold: no batch norm in the model" in report.notes
    assert report.to_dict()["changed"] is False
    assert "nothing to fold" in report.to_text()


def test_model_whose_batch_norms_are_all_kept_is_returned_exactly_as_it_was():
    model = act_bn_tail()  # Relu -> BN -> Softmax: folds nowhere
    keras = keras_conv_chain(("Mul", "Add"), layout=(1, 1, 7, 1))  # wrong axis, no-op Casts
    for m in (model, keras):
        folded, report = fold(m)
        assert folded.SerializeToString() == m.SerializeToString()
        assert not report.changed and report.kept
        assert "nothing to fold: every batch norm kept" in report.notes


def test_a_fold_still_removes_noop_casts_and_says_changed():
    keras = keras_conv_chain()
    folded, report = fold(keras)
    assert report.changed and report.folded and report.removed_casts == noop_casts(keras)
    assert report.to_dict()["changed"] is True


# --- opset below 7 -------------------------------------------------------------------------

def conv_bn_opset6(*, is_test: int | None = 1, spatial: int | None = None,
                   with_bn: bool = True) -> onnx.ModelProto:
    """x[batch, 4, 7, 7] -> Conv(6) -> BatchNormalization-6 (is_test, spatial) -> y, IR 3 (every
    initializer listed as an input, as opset-6 models are)."""
    schema = onnx.defs.get_schema("BatchNormalization", 6)
    assert schema.since_version == 6 and {"is_test", "spatial"} <= set(schema.attributes)
    rng = np.random.default_rng(0)
    params = trained_bn_params(6, rng)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 1, 6).astype(np.float32), "B")]
    inits += [numpy_helper.from_array(params[k].astype(np.float32), f"bn_{k}") for k in params]
    conv_out = "c" if with_bn else "y"
    nodes = [helper.make_node("Conv", ["x", "W", "B"], [conv_out], name="conv",
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    if with_bn:
        attrs = {k: v for k, v in (("is_test", is_test), ("spatial", spatial)) if v is not None}
        nodes.append(helper.make_node("BatchNormalization", ["c"] + [f"bn_{k}" for k in params],
                                      ["y"], name="bn", **attrs))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 7, 7])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "opset6", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             ["batch", 6, 7, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_opset6_batch_norm_is_converted_to_opset7_and_folded():
    model = conv_bn_opset6()
    folded, report = fold(model)
    assert report.upgraded_from == 6 and report.changed
    assert [d.action for d in report.decisions] == ["folded"]
    assert folded.opset_import[0].version == 7 and count_ops(folded)["BatchNormalization"] == 0
    assert report.to_dict()["upgraded_from"] == 6 and "opset 6 converted" in report.to_text()
    onnx.checker.check_model(folded, full_check=True)
    # onnxruntime has no BatchNormalization-6 kernel: onnx's conversion is the reference
    reference = upgrade(model)
    for seed in range(2):
        feeds = random_feeds(model, seed=seed)
        np.testing.assert_allclose(run_model(folded, feeds)["y"], run_model(reference, feeds)["y"],
                                   rtol=1e-4, atol=1e-5)


def test_opset6_without_batch_norm_is_passed_through():
    model = conv_bn_opset6(with_bn=False)
    folded, report = fold(model)
    assert folded.SerializeToString() == model.SerializeToString()
    assert report.upgraded_from is None and not report.changed
    assert "nothing to fold: no batch norm in the model" in report.notes


@pytest.mark.parametrize("is_test", [0, None], ids=["is_test0", "default"])
def test_opset6_training_mode_batch_norm_is_kept_unconverted(is_test):
    model = conv_bn_opset6(is_test=is_test)
    folded, report = fold(model)
    assert folded.SerializeToString() == model.SerializeToString()
    assert "is_test=0" in report.decisions[0].reason and report.decisions[0].action == "kept"


def test_opset6_per_activation_batch_norm_is_kept_and_the_model_unconverted():
    model = conv_bn_opset6(spatial=0)
    folded, report = fold(model)
    assert folded.SerializeToString() == model.SerializeToString()
    assert "spatial=0" in report.decisions[0].reason and report.upgraded_from is None


# --- the CLI -------------------------------------------------------------------------------

def test_cli_on_a_model_without_batch_norm_writes_a_byte_copy_without_a_check(tmp_path,
                                                                               monkeypatch):
    model_path, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(relu_mlp(), str(model_path))

    def no_session(*args, **kwargs):
        raise AssertionError("an onnxruntime session was created")

    monkeypatch.setattr(ort, "InferenceSession", no_session)
    result = CliRunner().invoke(main, ["fold", str(model_path), "-o", str(out),
                                       "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == model_path.read_bytes()
    data = json.loads(report.read_text())
    assert data["changed"] is False and data["verification"] is None
    assert any("nothing to fold" in n for n in data["notes"])
    assert "written as a copy" in result.output


def test_cli_in_place_with_nothing_to_fold_keeps_the_bytes(tmp_path):
    model_path = tmp_path / "m.onnx"
    onnx.save(conv_bn_opset6(with_bn=False), str(model_path))
    before = model_path.read_bytes()
    result = CliRunner().invoke(main, ["fold", str(model_path), "--in-place"])
    assert result.exit_code == 0, result.output
    assert model_path.read_bytes() == before
    assert "nothing to fold: no batch norm in the model" in result.output


def test_cli_folds_an_opset6_model_and_checks_it_against_the_conversion(tmp_path):
    model_path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(conv_bn_opset6(), str(model_path))
    result = CliRunner().invoke(main, ["fold", str(model_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "verification passed" in result.output and "opset 6 converted" in result.output
    assert count_ops(onnx.load(str(out)))["BatchNormalization"] == 0
