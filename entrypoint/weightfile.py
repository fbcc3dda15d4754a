"""Kept only for ``tests/e2e/test_restore.py``, which runs ``from fvboot import weightfile``
inside a baked image (to damage one weight byte); the weight path lives in
:mod:`fvboot.weights`. Remove this module once that test imports ``fvboot.weights``."""

from .weights import *  # noqa: F401,F403
from .weights import __all__  # noqa: F401
