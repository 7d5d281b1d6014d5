"""Progress bars (tqdm.auto) that every long-running function can turn off.

``progress=None`` follows the default, which is on unless the environment variable
``ROBUSTDL_PROGRESS`` is ``0`` (the book's executions and CI set it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled(progress: bool | None) -> bool:
    """Whether to show a bar: ``progress`` if given, else ``$ROBUSTDL_PROGRESS != "0"``."""
    return os.environ.get("ROBUSTDL_PROGRESS", "1") != "0" if progress is None else progress


def progress_bar(iterable: Iterable[T], progress: bool | None = None, **kwargs: object) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar unless progress is off."""
    return tqdm(iterable, disable=not progress_enabled(progress), leave=False, **kwargs)
