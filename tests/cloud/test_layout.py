"""One description of a deployment's home: the default home is read when asked (not at import)
and every command and the cloud settings agree on it; the sub-folders keep their on-disk names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cloud.layout import Layout
from cloud.settings import CloudSettings


def test_the_default_home_is_read_when_asked(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.delenv("FEDNANO_HOME", raising=False)
    assert Layout.default().home == Path("~/.cache/fednano").expanduser()
    monkeypatch.setenv("FEDNANO_HOME", "~/elsewhere")
    assert Layout.default().home == Path("~/elsewhere").expanduser()
    monkeypatch.setenv("FEDNANO_HOME", str(tmp_path))
    assert Layout.default() == Layout(tmp_path)


def test_the_sub_folders_keep_their_names(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert (layout.bases, layout.base("v1"), layout.llm, layout.features, layout.evals,
            layout.bundles, layout.data) == (
        tmp_path / "base", tmp_path / "base" / "v1", tmp_path / "llm", tmp_path / "features",
        tmp_path / "evals", tmp_path / "bundles", tmp_path)


def test_settings_default_to_the_layouts_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDNANO_HOME", raising=False)
    monkeypatch.delenv("FEDNANO_DATA_DIR", raising=False)
    settings = CloudSettings(secret_key="k" * 40, broker_password="p" * 40)
    assert settings.home == Layout.default().home
    assert settings.resolved_data_dir == Layout.default().data


@pytest.mark.parametrize("command", [("base", "info"), ("simulate",), ("fleet", "simulate"),
                                     ("demo",), ("bundle", "export")])
def test_every_home_option_defaults_to_the_layout(command: tuple[str, ...],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    import typer

    from fednano.cli import app

    group: Any = typer.main.get_command(app)
    for name in command:
        group = group.commands[name]
    home = next(p for p in group.params if p.name == "home")
    assert home.envvar == "FEDNANO_HOME"
    monkeypatch.setenv("FEDNANO_HOME", str(tmp_path))
    assert callable(home.default) and home.default() == tmp_path  # read at run time


def test_base_info_reads_the_home_from_the_environment(tmp_path: Path) -> None:
    from fednano.cli import app

    done = CliRunner().invoke(app, ["base", "info"], env={"FEDNANO_HOME": str(tmp_path)})
    assert done.exit_code != 0 and str(tmp_path) in str(done.exception)
