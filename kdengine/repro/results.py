"""The results writer of every reproduction and of the demo: each file is written atomically.

A file goes to a temporary name in its target folder, is fsynced, then ``os.replace``-d onto its
name (:func:`kdengine.train.checkpoint.atomic_output`): an interrupted run leaves the previous
result or the complete new one, never a truncated JSON next to a fresh markdown.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from torch import Tensor

from kdengine.train.checkpoint import atomic_output

__all__ = ["write_file", "write_files", "to_json", "pyplot", "save_figure"]

# str (UTF-8 text), bytes, or fn(temp_path) that writes the file itself and returns None, or a
# string saying why it wrote nothing (e.g. plotting unavailable)
Content = Union[str, bytes, Callable[[str], Optional[str]]]


def write_file(path: str | os.PathLike, content: Content) -> Optional[str]:
    """Write one file atomically. Returns None, or the reason a writer function gave for writing
    nothing (the target is then left as it was)."""
    try:
        with atomic_output(path) as tmp:
            if isinstance(content, str):
                tmp.write_text(content, encoding="utf-8")
            elif isinstance(content, bytes):
                tmp.write_bytes(content)
            else:
                why = content(str(tmp))
                if why is not None:
                    raise _Declined(why)
    except _Declined as d:
        return str(d)
    return None


class _Declined(Exception):
    """A writer function wrote nothing: abandons the temporary file."""


def write_files(out_dir: str | os.PathLike, files: Mapping[str, Content]) -> dict[str, str]:
    """Write ``{file name: content}`` into ``out_dir`` (created), each atomically; returns
    ``{file name: path written}`` (a writer function that declined is left out)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, content in files.items():
        if write_file(out / name, content) is None:
            written[name] = str(out / name)
    return written


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def to_json(obj: Any, indent: int = 1) -> str:
    """JSON text of a result (paths and tensors converted), newline-terminated."""
    return json.dumps(obj, indent=indent, default=_json_default) + "\n"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing (plots are the
    optional ``[plot]`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, dpi: int = 110) -> Callable[[str], None]:
    """A writer for :func:`write_file` that saves (then closes) a matplotlib figure as PNG."""
    def write(path: str) -> None:
        import matplotlib.pyplot as plt

        try:
            fig.savefig(path, format="png", dpi=dpi)
        finally:
            plt.close(fig)

    return write
