"""Argument checks shared by the op entry points.

Each raises TypeError / ValueError with a message that names the argument and what was expected,
so a wrong call fails at the entry point with the same wording whichever op it went to.
"""
from __future__ import annotations

import numbers
from typing import Any, Collection, Optional

import torch
from torch import Tensor


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``float32``."""
    return str(dtype).replace("torch.", "")


def dtype_list(dtypes: Collection[torch.dtype]) -> str:
    """``"float32, bfloat16, float16 or float64"``: the dtypes in their given order."""
    names = [dtype_name(d) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def real_number(name: str, value: object) -> float:
    """``value`` as a float: a real number, or a one-element tensor (read with ``.item()``).
    bool is refused even though it is an int: a flag passed for a number is a mistake."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def floating_tensor(
    name: str,
    x: object,
    dtypes: Optional[Collection[torch.dtype]] = None,
    *,
    tensor_of: str = "",
    listed: bool = False,
    values_of: str = "",
) -> Tensor:
    """``x``, checked to be a tensor with a dtype in ``dtypes`` (None: any floating dtype).

    The messages read ``"{name} must be a torch.Tensor{tensor_of}, got <type>"`` and
    ``"{name} must be a floating tensor[ (<dtypes>)]{values_of}, got dtype <dtype>"``, the dtype
    list written out when ``listed``; ``tensor_of`` / ``values_of`` say what the tensor holds
    (e.g. ``" of logits"``) or that None is also accepted (``" or None"``).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{tensor_of}, got {type(x).__name__}")
    if not (x.dtype.is_floating_point if dtypes is None else x.dtype in dtypes):
        listing = f" ({dtype_list(dtypes)})" if listed and dtypes is not None else ""
        raise TypeError(f"{name} must be a floating tensor{listing}{values_of}, got dtype {x.dtype}")
    return x


def same_device(name: str, t: Any, other_name: str, other: Any) -> None:
    """ValueError unless ``t`` is on ``other``'s device (the kernels read both from one device);
    either may be anything with a ``device`` (a tensor, packed bits)."""
    if t.device != other.device:
        raise ValueError(f"{name} is on {t.device} but {other_name} on {other.device}; expected one device")


def flag(name: str, value: object) -> bool:
    """``value``, checked to be a bool (not merely truthy: ``0``/``"no"`` passed for a flag is
    more likely a misplaced argument than a choice)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
