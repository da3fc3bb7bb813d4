"""The ``cellpert`` command: a thin typer layer over the library.

Errors the user can fix (:class:`cellpert.CellpertError`) are printed as one line
(``error: ...``) with a non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Annotated

import typer

from cellpert import __version__
from cellpert._errors import CellpertError, CellpertWarning
from cellpert_cli._evaluate import evaluate_ate
from cellpert_cli._export import export_latents
from cellpert_cli._inspect import inspect
from cellpert_cli._options import set_threads
from cellpert_cli._simulate import simulate_app
from cellpert_cli._train import train

#: Exit code for input the user can fix; unexpected failures exit with 1.
EXIT_INPUT_ERROR = 2

app = typer.Typer(
    name="cellpert",
    help=(
        "Model single-cell perturbation screens (SAMS-VAE, sVAE, comparative VAEs) and write "
        "what the models learn back into the .h5ad.\n\n"
        "Example: cellpert simulate sams -o s.h5ad && cellpert inspect s.h5ad"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class _State:
    debug = False


class _StderrHandler(logging.Handler):
    """Log lines to whatever ``sys.stderr`` is when they are written."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - closed streams etc.
            self.handleError(record)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cellpert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="CPU threads for torch and the BLAS libraries (default: the cores this process may use). "
            "Processes sharing cores should split them: two 2-thread runs on 2 cores are several times slower "
            "than two 1-thread runs.",
            min=1,
        ),
    ] = None,
) -> None:
    """cellpert: perturbation models for single-cell screens."""
    _State.debug = debug
    set_threads(threads)
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _StderrHandler)] + [_StderrHandler()]
    root.setLevel(level)
    logging.getLogger("cellpert").setLevel(level)
    for noisy in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning", "anndata", "numba"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)


app.add_typer(simulate_app, name="simulate", help="Simulate a screen with known ground truth (docs/models.md, *Simulators*).")
app.command("inspect")(inspect)
app.command("train")(train)
app.command("export-latents")(export_latents)
app.command("evaluate-ate")(evaluate_ate)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    if issubclass(category, CellpertWarning) or _State.debug:
        print(f"warning: {message}", file=sys.stderr)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _State.debug = "--debug" in argv
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        app(args=argv, prog_name="cellpert", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except CellpertError as err:
        if _State.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # anything else is our bug: still one line unless --debug
        if _State.debug:
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        print(
            f"error: unexpected {type(err).__name__}: {first} (run again with --debug for the "
            "traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        warnings.showwarning = previous
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":  # pragma: no cover
    main()
