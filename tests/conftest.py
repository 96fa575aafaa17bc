"""Hypothesis: random examples on a developer's machine (new cases each run), a fixed sequence in
CI (CI=true), so that a submission's result does not depend on the draw."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
