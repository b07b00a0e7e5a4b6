"""One tqdm bar per stage (one line each, named), and each stage's wall time."""
from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["Stages"]


class _NullBar:
    """Stands in for a tqdm bar when progress output is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    n = 0
    total = None

    def refresh(self) -> None:
        pass


class Stages:
    """Opens the stages of a run in order; records ``seconds[name]`` (wall) and ``cpu[name]``.

    ``with stages.stage("teacher", total=steps) as bar: ... bar.update()`` draws one line
    ``[1/6] teacher |#####| 100/100 [...]`` that stays on screen when the stage ends.
    """

    def __init__(self, names: list[str], enabled: bool = True, stream=None) -> None:
        self.names = list(names)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def stage(self, name: str, total: Optional[int] = None) -> "_Stage":
        if name not in self.names:
            raise ValueError(f"unknown stage {name!r}; stages: {self.names}")
        return _Stage(self, name, total)


class _Stage:
    def __init__(self, owner: Stages, name: str, total: Optional[int]) -> None:
        self.owner, self.name, self.total = owner, name, total

    def __enter__(self):
        o = self.owner
        i = o.names.index(self.name) + 1
        if o.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=f"[{i}/{len(o.names)}] {self.name:<9}", leave=True,
                            file=o.stream, dynamic_ncols=True, unit="it")
        else:
            self.bar = _NullBar()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self.bar

    def __exit__(self, exc_type, *exc) -> None:
        self.owner.seconds[self.name] = round(time.perf_counter() - self.t0, 2)
        self.owner.cpu[self.name] = round(time.process_time() - self.c0, 2)
        if exc_type is None and self.bar.total is not None and self.bar.n < self.bar.total:
            self.bar.total = self.bar.n  # the total was an upper bound (e.g. the scaling search)
            self.bar.refresh()
        self.bar.close()
