"""The fold rules, in the order they are tried for every batch norm.

Each rule takes a `GraphView` and an `Affine` and returns a `Plan` (all checks passed) or the
reason it does not apply. The first plan wins.
"""

from bnfold.rules.backward import plan_backward
from bnfold.rules.forward import plan_forward

RULES = (
    ("backward", plan_backward),  # into the producer: Conv, ConvTranspose, Gemm, MatMul(+Add)
    ("forward", plan_forward),  # into the consumer: Gemm, MatMul(+Add), Conv; through Flatten
)
