"""The ``cellpert`` command: a thin typer layer over the library.

Errors the user can fix (:class:`cellpert.CellpertError`) are printed as one line
(``error: ...``) with a non-zero exit code; ``--debug`` shows the traceback instead.
Training stopped by Ctrl-C or SIGTERM prints one line saying where the checkpoint is and
how to continue (``cellpert train --resume DIR``), and exits with 130 or 143 (128 + the
signal, the shell's convention).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Annotated

import typer

try:  # typer >= 0.20 ships its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

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
#: Exit code after Ctrl-C (128 + SIGINT); training stopped by SIGTERM exits with 143
#: (128 + SIGTERM), after saving a checkpoint (``cellpert train --resume DIR`` continues).
EXIT_SIGINT = 130

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


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _help_hint(err: UsageError) -> str:
    """``; see 'cellpert train --help'`` for a usage error raised inside a command."""
    ctx = getattr(err, "ctx", None)
    return f"; see '{ctx.command_path} --help'" if ctx is not None else ""


def _is_training_interrupted(err: BaseException) -> bool:
    """Whether ``err`` is :class:`cellpert.runs.TrainingInterrupted` (looked up only once
    training was imported, so that the CLI starts without importing torch)."""
    cls = getattr(sys.modules.get("cellpert.models._checkpoint"), "TrainingInterrupted", None)
    return cls is not None and isinstance(err, cls)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _State.debug = "--debug" in argv
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        # not standalone: usage errors come back as exceptions, printed below as one line
        code = app(args=argv, prog_name="cellpert", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except NoArgsIsHelpError as err:  # `cellpert` alone: the help, as typer prints it
        err.show()
        return err.exit_code
    except UsageError as err:  # typer's own checks: unknown option, --threads 0, missing argument
        print(f"error: {_one_line(err.format_message()).rstrip('.')}{_help_hint(err)}.", file=sys.stderr)
        return err.exit_code
    except ClickException as err:
        print(f"error: {_one_line(err.format_message())}", file=sys.stderr)
        return err.exit_code
    except typer.Abort as err:
        if isinstance(err.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            print("error: interrupted", file=sys.stderr)
            return EXIT_SIGINT
        print("error: aborted", file=sys.stderr)
        return 1
    except CellpertError as err:
        if _State.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except Exception as err:  # anything else is our bug: still one line unless --debug
        if _is_training_interrupted(err):  # SIGINT / SIGTERM while training: checkpoint saved
            print(str(err), file=sys.stderr)
            return err.exit_code
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
