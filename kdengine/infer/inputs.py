"""Checks on the INPUT files of ``kdengine infer`` made *before* reading their data.

An input file is untrusted: a 1.5 MB ``.npz`` can decompress to 1.5 GB, a ``.npy`` header can
claim 10^12 elements, a path can be a FIFO that blocks forever or a device that never ends.
:func:`check_input_file` reads only the headers (the ``.npy`` header of each member of an
``.npz``, the JSON header of a ``.safetensors``) and refuses, with a ValueError naming the file,
anything that is not a regular file or whose decoded arrays would exceed ``max_bytes``.
"""
from __future__ import annotations

import json
import math
import struct
import zipfile
from typing import IO

import numpy as np

from kdengine._integrity import check_regular_file  # re-exported: infer's callers use it

DEFAULT_MAX_INPUT_MB = 256
DEFAULT_MAX_INPUT_BYTES = DEFAULT_MAX_INPUT_MB * 2**20

_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

__all__ = ["DEFAULT_MAX_INPUT_MB", "DEFAULT_MAX_INPUT_BYTES", "check_regular_file", "check_input_file"]


def _npy_nbytes(f: IO[bytes], where: str) -> int:
    """Decoded size in bytes of the .npy array whose header starts at ``f``'s position."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise ValueError(f"{where}: not a readable .npy array header: {exc}") from None
    return math.prod(int(d) for d in shape) * max(int(dtype.itemsize), 1)


def _limit_error(where: str, nbytes: int, max_bytes: int) -> ValueError:
    return ValueError(
        f"{where}: the input arrays would take {nbytes / 2**20:.1f} MiB decoded, over the limit of "
        f"{max_bytes / 2**20:.1f} MiB (raise it with --max-input-mb, or max_input_bytes= in Python)"
    )


def check_input_file(path: str, max_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> int:
    """Check an input file before loading it: a regular file, whose arrays decode to at most
    ``max_bytes`` (from the headers only; nothing is decompressed). Returns the decoded size."""
    st = check_regular_file(path, "input file")
    low = path.lower()
    total = 0
    try:
        if low.endswith(".npy"):
            with open(path, "rb") as f:
                total = _npy_nbytes(f, path)
        elif low.endswith(".npz"):
            try:
                with zipfile.ZipFile(path) as z:
                    for info in z.infolist():
                        with z.open(info) as member:
                            total += _npy_nbytes(member, f"{path} (member {info.filename!r})")
                        if total > max_bytes:
                            break
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as exc:
                raise ValueError(f"{path}: not a readable .npz archive: {exc}") from None
        elif low.endswith(".safetensors"):
            # The tensors' bytes are stored uncompressed in the file: the header must agree.
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError(f"{path}: truncated safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > st.st_size - 8:
                    raise ValueError(f"{path}: truncated safetensors file (header length {n})")
                try:
                    header = json.loads(f.read(n))
                except (RecursionError, ValueError) as exc:
                    raise ValueError(f"{path}: the safetensors header is not valid JSON: {exc}") from None
            if not isinstance(header, dict):
                raise ValueError(f"{path}: the safetensors header is not a JSON object")
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                try:
                    total += math.prod(int(d) for d in info["shape"]) * _ST_ITEMSIZE.get(info["dtype"], 8)
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"{path}: tensor {name!r} has no valid shape/dtype in the header") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if total > max_bytes:
        raise _limit_error(path, total, max_bytes)
    return total
