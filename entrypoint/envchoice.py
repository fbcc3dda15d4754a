"""A setting read from the environment that takes one of a few words (FV_WEIGHT_CHECK,
FV_WAKE_ORDER, FV_WEIGHT_STAGING): read before the restore, so a bad value is found, and said
with the words it takes, before CRIU runs. Torch-free: the weight stager reads one too."""

from __future__ import annotations

import os
from typing import Sequence

from .errors import CheckpointUnusable


def choice(name: str, choices: Sequence[str], default: str) -> str:
    """NAME's value, case and surrounding blanks aside (DEFAULT when unset or blank);
    CheckpointUnusable when it is none of CHOICES."""
    raw = os.environ.get(name)
    value = (raw or "").strip().lower() or default
    if value not in choices:
        words = ", ".join(choices[:-1]) + " or " + choices[-1]
        raise CheckpointUnusable(f"{name}={raw!r}: expected {words}")
    return value
