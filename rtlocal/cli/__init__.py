"""The commands: the Typer app in cli/app.py and one module per verb; `main` is the console entry point."""


def main(argv: list[str] | None = None) -> int:
    """`rtlocal`: run the command line (imported here lazily so that this package imports nothing)."""
    from rtlocal.cli.app import main as run

    return run(argv)
