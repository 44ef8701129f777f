"""``--version`` for FedNano's commands (``fednano`` and ``fednano-edge``), so each reports the
installed package's version the same way."""

from __future__ import annotations

import typer


def add_version_option(app: typer.Typer, prog: str) -> None:
    """Give ``app`` a ``--version`` that prints ``prog`` and the installed ``fednano`` version,
    then exits before any command runs."""

    def print_version(value: bool) -> None:
        if not value:
            return
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"{prog} {version('fednano')}")
        except PackageNotFoundError:
            print(f"{prog} (not installed as a package)")
        raise typer.Exit()

    def main(version: bool = typer.Option(False, "--version", callback=print_version,
                                          is_eager=True,
                                          help="Print the version and exit.")) -> None:
        """FedNano."""

    app.callback()(main)
