"""The process-splitting interface generation needs, and its single-process implementation.

Generation takes an ``accelerate.Accelerator`` or ``accelerate.PartialState`` to split work over processes; only the
members listed in :class:`ProcessSplitter` are used, so tests and scripts can pass a small stand-in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol


class ProcessSplitter(Protocol):
    """The part of ``accelerate.Accelerator`` / ``accelerate.PartialState`` that generation uses."""

    num_processes: int
    process_index: int
    is_main_process: bool
    is_local_main_process: bool

    def split_between_processes(self, inputs: list, apply_padding: bool = False) -> contextlib.AbstractContextManager:
        """Context manager yielding this process's share of ``inputs``."""

    def wait_for_everyone(self) -> None:
        """Barrier across processes."""


class SingleProcess:
    """A :class:`ProcessSplitter` for a single process, used when no accelerator is given."""

    num_processes = 1
    process_index = 0
    is_main_process = True
    is_local_main_process = True

    @contextlib.contextmanager
    def split_between_processes(self, inputs: list, apply_padding: bool = False) -> Iterator[list]:
        yield inputs

    def wait_for_everyone(self) -> None:
        pass
