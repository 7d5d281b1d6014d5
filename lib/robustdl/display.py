"""Notebook display helpers: the chapters show the library's own code, never a copy."""

from __future__ import annotations

import inspect

from IPython.display import Markdown

__all__ = ["show_source"]


def show_source(obj: object) -> Markdown:
    """The source of a library function or class, as a highlighted code block for a notebook."""
    try:
        source = inspect.getsource(obj)  # type: ignore[arg-type]
    except (TypeError, OSError) as err:
        raise TypeError(f"obj must be a function, class or module with source, got {obj!r}") from err
    return Markdown(f"```python\n{source}```")
