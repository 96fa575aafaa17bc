"""bnfold: exact batch-normalization folding and insertion for ONNX models.

    model = bnfold.load("model.onnx")
    folded, report = bnfold.fold(model)
    print(report.to_text())
"""

from bnfold.artifacts import ArtifactsReport, training_artifacts, training_plan
from bnfold.calibrate import calibrate
from bnfold.errors import BadInput, BnfoldError, VerificationFailed
from bnfold.fold import fold
from bnfold.insert import insert
from bnfold.inspect import inspect
from bnfold.io import load, save
from bnfold.report import (BnCalibration, CalibrateReport, Decision, FoldReport,
                           OutputComparison, VerifyReport)
from bnfold.verify import verify

__all__ = [
    "ArtifactsReport",
    "BadInput",
    "BnCalibration",
    "BnfoldError",
    "CalibrateReport",
    "Decision",
    "FoldReport",
    "OutputComparison",
    "VerificationFailed",
    "VerifyReport",
    "calibrate",
    "fold",
    "insert",
    "inspect",
    "load",
    "save",
    "training_artifacts",
    "training_plan",
    "verify",
]
__version__ = "0.1.0"
