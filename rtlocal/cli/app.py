"""The `rtlocal` command: the Typer app, one module per verb beside it (cli/generate.py, chat.py, ...).

Each command is a thin layer over typed functions in rtlocal.runtime, rtlocal.evaluation or finetune/;
the flags several commands share are defined once in cli/flags.py.

Errors: an RtlocalError prints one `Error: ...` line on stderr and exits 1; bad flags exit 2
(Click's usage errors, and UsageError: values out of range, repeated or contradictory flags, all
checked before any model loads); `--debug` shows tracebacks.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rtlocal.cli import chat, convert, evaluate, generate, models, serve, train
from rtlocal.constants import ExitCode
from rtlocal.errors import Interrupted, RtlocalError, UsageError

app = typer.Typer(
    name="rtlocal",
    help="Dial how often a local language model refuses, per kind of request (refusal tokens).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_DEBUG = False


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    global _DEBUG
    _DEBUG = debug


# The commands, in the order `rtlocal --help` lists them.
app.command()(generate.generate)
app.command()(chat.chat)
app.command()(convert.convert)
app.command("inspect")(models.inspect_cmd)
app.command("models")(models.models_cmd)
app.command()(train.finetune)
app.command()(train.build)
data_app.command("distill")(train.distill_cmd)
app.command("eval")(evaluate.eval_cmd)
app.command("calibrate")(evaluate.calibrate_cmd)
app.command()(serve.serve)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the Typer app, turning RtlocalError into one line and an exit code."""
    try:
        rc = app(args=argv, prog_name="rtlocal", standalone_mode=False)
    except RtlocalError as e:
        if _DEBUG:
            raise
        print(f"Error: {e}", file=sys.stderr)
        return int(ExitCode.USAGE if isinstance(e, UsageError) else ExitCode.ERROR)
    except Interrupted as e:
        print(e, file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except typer.Exit as e:
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except Exception as e:  # Click's usage errors arrive here in non-standalone mode
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):  # a ClickException (Typer bundles its own Click)
            show()
            return code
        if _DEBUG:
            raise
        print(f"Error: {type(e).__name__}: {e} (run with --debug for a traceback)", file=sys.stderr)
        return int(ExitCode.ERROR)
    if rc == ExitCode.INTERRUPTED:  # Typer turns Ctrl-C in a command into a silent return of 130
        print("interrupted", file=sys.stderr)
    return rc if isinstance(rc, int) else int(ExitCode.OK)

