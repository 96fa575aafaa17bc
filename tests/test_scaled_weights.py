"""`affine.scaled`: a backward fold's weight scaled a block of rows at a time gives the bytes of
the whole float64 product (and its refusal reasons), whatever the block size."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest

import bnfold.affine as affine
from bnfold.affine import cast_to, scaled

T = onnx.TensorProto


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 18])
@pytest.mark.parametrize("dtype, data_type", [(np.float32, T.FLOAT), (np.float16, T.FLOAT16),
                                              (ml_dtypes.bfloat16, T.BFLOAT16),
                                              (np.float64, T.DOUBLE)])
@pytest.mark.parametrize("shape, factor_shape", [((12, 5, 3, 3), (12, 1, 1, 1)),  # Conv
                                                 ((12, 6, 2), (12, 6, 1)),  # ConvTranspose
                                                 ((9, 12), (9, 1)), ((9, 12), (1, 12))])  # Gemm
def test_scaled_in_blocks_equals_the_whole_product(monkeypatch, block, dtype, data_type, shape,
                                                   factor_shape):
    rng = np.random.default_rng(block)
    w = rng.normal(size=shape).astype(dtype)
    factor = rng.uniform(0.3, 3.0, factor_shape)
    monkeypatch.setattr(affine, "_BLOCK", block)
    got = scaled(w, factor, data_type)
    expected = cast_to(w.astype(np.float64) * factor, data_type)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("block", [1, 5, 1 << 18])
def test_scaled_in_blocks_refuses_with_the_whole_weights_reason(monkeypatch, block):
    w = np.ones((10, 4), np.float16)
    w[7, 2] = 60000  # only one block overflows
    factor = np.full((10, 1), 2.0)
    monkeypatch.setattr(affine, "_BLOCK", block)
    reason = scaled(w, factor, T.FLOAT16)
    assert isinstance(reason, str) and "overflows float16" in reason
    assert reason == cast_to(w.astype(np.float64) * factor, T.FLOAT16)
    w[7, 2] = np.nan
    assert scaled(w, factor, T.FLOAT16) == "folded weights are not finite"
