"""The thread lifecycle shared by the cloud's long-running services (coordinator, LLM worker)."""

from __future__ import annotations

import threading
from typing import TypeVar

S = TypeVar("S", bound="BackgroundService")


class BackgroundService:
    """``start`` runs ``run`` in a daemon thread; ``run`` loops until ``stopping``; ``stop``
    asks it to end (after its current step) and waits. ``alive`` is what a supervisor such as
    ``fednano cloud serve`` watches."""

    def __init__(self, thread_name: str) -> None:
        self._thread_name = thread_name
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """The service's loop (until ``stopping``); runs in the calling thread if called."""
        raise NotImplementedError

    @property
    def stopping(self) -> bool:
        """Whether ``stop`` was asked for: ``run`` ends its loop."""
        return self._stop_event.is_set()

    def start(self: S) -> S:
        """``run`` in a background thread (``RuntimeError`` if already started)."""
        if self._thread is not None:
            raise RuntimeError(f"{self._thread_name} already started")
        self._stop_event.clear()
        self._thread = threading.Thread(target=self.run, daemon=True, name=self._thread_name)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the thread started by ``start`` is still running."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop after its current step and wait up to ``timeout`` s for the thread."""
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
