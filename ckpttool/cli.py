"""The ``ckpttool`` command line: parse flags, call the library, render, exit.

Library errors become one line on stderr (``ckpttool: error: ...``) and exit code 2 here and
only here; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
import traceback

import click

from ckpttool import __version__
from ckpttool.errors import EXIT_ERROR, EXIT_OK, CkptToolError


class _Group(click.Group):
    """A click group that turns every failure into one line and a documented exit code."""

    def main(self, args=None, prog_name=None, **extra):
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args
        try:
            code = super().main(args=args, prog_name=prog_name or "ckpttool",
                                standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            code = e.exit_code
        except click.Abort:
            _error("interrupted")
            code = EXIT_ERROR
        except click.ClickException as e:
            hint = ""
            if isinstance(e, click.UsageError) and e.ctx is not None:
                hint = f" (see '{e.ctx.command_path} --help')"
            _error(e.format_message() + hint)
            code = EXIT_ERROR if isinstance(e, click.UsageError) else e.exit_code
        except CkptToolError as e:
            if debug:
                traceback.print_exc()
            _error(str(e))
            code = EXIT_ERROR
        except KeyboardInterrupt:
            _error("interrupted")
            code = EXIT_ERROR
        except Exception as e:  # a bug: still one line, with the way to see more
            if debug:
                traceback.print_exc()
            _error(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the "
                   "traceback and please report it)")
            code = EXIT_ERROR
        sys.exit(EXIT_OK if code is None else code)


def _error(message: str) -> None:
    click.echo(f"ckpttool: error: {' '.join(str(message).split())}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ckpttool")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Inspect, diff and safely reschedule the optimizer and LR-scheduler state saved in
    PyTorch checkpoints.

    \b
    Example:
      ckpttool show fixtures/adamw_cosine.pt
    """


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print ckpttool.show/1 JSON.")
@click.option("--verify", is_flag=True,
              help="Replay each schedule with real torch and say whether the stored state is "
                   "bit-identical to a clean run (imports torch).")
def show(paths: tuple[str, ...], as_json: bool, verify: bool) -> int:
    """Show the optimizer and scheduler state of checkpoints: per-group lr and initial_lr,
    scheduler class, step and arguments, and findings that would break a resume.

    Reads no tensor data and runs no code from the file. Several PATHs give one report each
    (a JSON list with --json); a PATH that fails is reported and the exit code is 2.

    \b
    Example:
      ckpttool show fixtures/adamw_cosine.pt
      ckpttool show --json --verify run/ckpt.pt
    """
    from ckpttool import inspection, render

    docs, failed = [], False
    for i, path in enumerate(paths):
        try:
            ckpt = inspection.load(path, verify=verify)
        except CkptToolError as e:
            if len(paths) == 1:
                raise
            _error(str(e))
            failed = True
            docs.append({"schema": render.SHOW_SCHEMA, "path": path, "error": str(e)})
            continue
        if as_json:
            docs.append(render.show_dict(ckpt))
        else:
            click.echo(("\n" if i else "") + render.show_text(ckpt), nl=False)
    if as_json:
        click.echo(render.dumps(docs if len(paths) > 1 else docs[0]))
    return EXIT_ERROR if failed else EXIT_OK


def main() -> None:
    """Console-script entry point."""
    cli.main()
