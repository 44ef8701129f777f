"""The cloud assembled outside the CLI (``cloud.service``): the same parts any entry point gets."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from cloud import service
from cloud.db.session import session_scope
from cloud.rounds import load_schedule
from cloud.settings import CloudSettings


@pytest.fixture
def settings(tmp_path: Path) -> CloudSettings:
    return CloudSettings(home=tmp_path, secret_key="k" * 40, broker_password="p" * 40,
                         environment="test")


def test_a_schedule_is_stored_once_and_kept_by_a_restart(settings: CloudSettings) -> None:
    service.schedule(settings, None, None)  # nothing asked: nothing stored
    with session_scope(service.sessions(settings)) as session:
        assert not load_schedule(session).enabled
    service.schedule(settings, 3, None)
    with session_scope(service.sessions(settings)) as session:
        first = load_schedule(session)
    service.schedule(settings, 3, None)  # the same command restarted
    with session_scope(service.sessions(settings)) as session:
        assert load_schedule(session) == first and first.enabled and first.target_rounds == 3


def test_a_dead_service_thread_stops_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    killed = threading.Event()
    monkeypatch.setattr(service.os, "kill", lambda pid, sig: killed.set())
    stopping, died = threading.Event(), threading.Event()
    alive, dead = SimpleNamespace(alive=True), SimpleNamespace(alive=False)
    service._stop_when_a_service_dies([alive, dead], stopping, died)
    assert killed.wait(5) and died.is_set()
