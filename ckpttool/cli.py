"""The ``ckpttool`` command line: parse flags, call the library, render, exit.

Library errors become one line on stderr (``ckpttool: error: ...``) and exit code 2 here and
only here; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
import textwrap
import traceback

import click

from ckpttool import __version__
from ckpttool.errors import EXIT_DIFFERENT, EXIT_ERROR, EXIT_OK, CkptToolError


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
        except click.exceptions.NoArgsIsHelpError as e:  # bare `ckpttool`: the help, as help
            click.echo(e.ctx.get_help())
            code = EXIT_OK
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
        except OSError as e:  # the machine's refusal (full disk, permissions), not a bug
            if debug:
                traceback.print_exc()
            where = f"{e.filename}: " if e.filename else ""
            _error(f"{where}{e.strerror or e}; nothing was written")
            code = EXIT_ERROR
        except Exception as e:  # a bug: still one line, with the way to see more
            if debug:
                traceback.print_exc()
            _error(_internal_error(e))
            code = EXIT_ERROR
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
        sys.exit(EXIT_OK if code is None else code)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader went away (`ckpttool show ... | head -1`): it has all it wanted. (Here,
            # before click's own handler, which would exit 1.)
            _silence_stdout()
            return EXIT_OK


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's own flush at exit does not fail
    on the closed pipe again (the Python documentation's recipe for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _internal_error(e: Exception) -> str:
    try:
        detail = f": {e}"
    except Exception:  # a message that cannot be written (an absurd int in it)
        detail = ""
    return (f"internal error: {type(e).__name__}{detail} (rerun with --debug for the traceback "
            "and please report it)")


def _error(message: str) -> None:
    click.echo(f"ckpttool: error: {' '.join(str(message).split())}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ckpttool")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Inspect and safely reschedule the optimizer and LR-scheduler state saved in
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

    debug = click.get_current_context().find_root().params.get("debug", False)
    docs, failed = [], False
    for i, path in enumerate(paths):
        try:
            ckpt = inspection.load(path, verify=verify)
            # Rendered here, so that a failure to render one PATH is that PATH's failure.
            out = (render.dumps(render.show_dict(ckpt)) if as_json
                   else ("\n" if i else "") + render.show_text(ckpt))
        except Exception as e:
            if len(paths) == 1:
                raise
            if debug:
                traceback.print_exc()
            # With several PATHs one that fails, even by a bug, must not lose the others.
            message = str(e) if isinstance(e, CkptToolError) else f"{path}: {_internal_error(e)}"
            _error(message)
            failed = True
            if as_json:
                docs.append(render.dumps({"schema": render.SHOW_SCHEMA, "path": path,
                                          "error": message}))
            continue
        if as_json:
            docs.append(out)
        else:
            click.echo(out, nl=False)
    if as_json:  # the same text json.dumps(indent=2) writes for the list, one document at a time
        click.echo(docs[0] if len(paths) == 1
                   else "[\n" + ",\n".join(textwrap.indent(d, "  ") for d in docs) + "\n]")
    return EXIT_ERROR if failed else EXIT_OK


@cli.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--rtol", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Relative tolerance: x equals y when |x-y| <= atol + rtol*|y|.")
@click.option("--atol", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Absolute tolerance (see --rtol); both 0: exact.")
@click.option("--only", multiple=True, type=click.Choice(["optimizer", "scheduler", "tensors",
                                                          "other"]),
              help="Compare only this section; repeatable.")
@click.option("--ignore", multiple=True, metavar="GLOB",
              help="Skip paths matching GLOB (and what is under them), e.g. 'model/*'; "
                   "repeatable.")
@click.option("--limit", type=click.IntRange(min=0), metavar="N",
              help="List at most N items per section (default 20; JSON: all); 0: all.")
@click.option("--json", "as_json", is_flag=True, help="Print ckpttool.diff/1 JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def diff(a, b, rtol, atol, only, ignore, limit, as_json, quiet) -> int:
    """Compare two checkpoints: optimizer hyperparameters per group, scheduler fields, other
    values, and every tensor (model included).

    Tensors are compared by their raw bytes first, without loading them; only tensors whose
    bytes differ are read as numbers (max |a-b|, max relative difference, elements that
    differ). Exit code 0: equal, 1: different, 2: error.

    \b
    Example:
      ckpttool diff run/step500.pt run/step500-rescheduled.pt
      ckpttool diff a.pt b.pt --only tensors --atol 1e-6 --ignore 'optimizer/*'
    """
    from ckpttool import diffing, render

    result = diffing.diff(a, b, rtol=rtol, atol=atol, only=only, ignore=ignore,
                       progress=None if quiet else _progress_bar("comparing"))
    if as_json:
        click.echo(render.dumps(render.diff_dict(result, limit=limit)))
    else:
        click.echo(render.diff_text(result, limit=render.DIFF_LIMIT if limit is None else limit),
                   nl=False)
    return EXIT_OK if result.equal else EXIT_DIFFERENT


def _new_schedule_options(command):
    """--scheduler, --set, --lr, --scale-lr: the new schedule, the same for reschedule and plot
    (both hand them to rescheduling.reschedule), and --optimizer to choose whose."""
    for option in reversed([
        click.option("--scheduler", "spec", metavar="SPEC",
                     help="The new schedule: 'CosineAnnealingLR(T_max=2000)', or FILE.py:FUNC / "
                          "module:FUNC, a factory FUNC(optimizer) -> scheduler."),
        click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
                     help="Change one argument of the stored (or given) schedule; repeatable."),
        click.option("--lr", "lrs", multiple=True, metavar="[GROUP=]VALUE",
                     help="New base lr for every group, or for one group; repeatable."),
        click.option("--scale-lr", type=float, metavar="FACTOR", help="Multiply the base lrs."),
        click.option("--optimizer", "optimizer", metavar="LOCATION",
                     help="Which optimizer, when the checkpoint holds several (see `show`)."),
    ]):
        command = option(command)
    return command


@cli.command()
@click.argument("source", type=click.Path())
@click.option("-o", "--output", "output", type=click.Path(), help="Write the result here.")
@click.option("--in-place", is_flag=True, help="Rewrite SOURCE itself (keeps SOURCE.bak).")
@_new_schedule_options
@click.option("--step", type=click.IntRange(min=0), help="Resume position (default: stored).")
@click.option("--device", help="Device for the recompute of tensor lrs (default: where saved).")
@click.option("--momentum", type=float,
              help="Momentum / beta1 to leave when the old schedule cycled it.")
@click.option("--scheduler-key", default="scheduler", show_default=True,
              help="Key for the new scheduler state when the checkpoint has none.")
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite an existing output (or backup).")
@click.option("--no-backup", is_flag=True, help="With --in-place: keep no SOURCE.bak.")
@click.option("--json", "as_json", is_flag=True, help="Print ckpttool.reschedule/1 JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--plot", "plot_path", type=click.Path(), metavar="FILE.png",
              help="Also draw the old and new lr curves, resume point marked (needs the [plot] "
                   "extra).")
def reschedule(source, output, in_place, spec, sets, lrs, scale_lr, optimizer, step, device,
               momentum, scheduler_key, dry_run, force, no_backup, as_json, quiet,
               plot_path) -> int:
    """Rewrite the schedule or learning rates of a saved run, resume-safely.

    The real torch scheduler is re-stepped to the resume step, so the output holds exactly what
    a run with the new schedule would hold there; tensor bytes are copied untouched. The output
    is re-read and verified before ckpttool says so.

    \b
    Example:
      ckpttool reschedule fixtures/adamw_cosine.pt -o longer.pt --set T_max=80
      ckpttool reschedule run.pt -o run2.pt --scheduler "OneCycleLR(max_lr=0.01, total_steps=4000)"
      ckpttool reschedule run.pt --in-place --scale-lr 0.5
      ckpttool reschedule run.pt --dry-run --set T_max=4000 --plot lr.png
    """
    from ckpttool import render
    from ckpttool import rescheduling as core

    if not dry_run and bool(output) == bool(in_place):
        raise click.UsageError("give exactly one of -o OUT and --in-place (or --dry-run)")
    if plot_path:
        from ckpttool import plot

        plot.require_matplotlib()  # before anything is written
    from ckpttool import inspection

    progress = None if quiet else _progress_bar("replaying")
    ckpt = inspection.load(source)
    staged = None  # the big tensor records are copied while torch loads and the replay runs
    if not dry_run:
        staged = core.start_output(ckpt, source if in_place else output,
                                   optimizer=optimizer, force=force)
    try:
        plan = core.reschedule(ckpt, scheduler=spec, sets=sets, lr=lrs, scale_lr=scale_lr,
                               step=step, device=device, optimizer=optimizer, momentum=momentum,
                               scheduler_key=scheduler_key, progress=progress)
        if plot_path:
            plot.draw_png(plot.plan_series(plan, progress=progress), plot_path)
            _note(f"wrote {plot_path}")
        saved = None
        if not dry_run:
            saved = (plan.save_in_place(backup=not no_backup, force=force, staged=staged)
                     if in_place else plan.save(output, force=force, staged=staged))
    except BaseException:
        if staged is not None:
            staged.abort()
        raise
    if as_json:
        click.echo(render.dumps(render.reschedule_dict(plan, saved)))
    else:
        click.echo(render.reschedule_text(plan, saved), nl=False)
    return EXIT_OK


@cli.command()
@click.argument("source", type=click.Path())
@click.option("-o", "--output", "output", type=click.Path(), metavar="FILE.png",
              help="Draw a PNG here (needs the [plot] extra); without it, sparklines.")
@click.option("--steps", type=click.IntRange(min=1), metavar="N",
              help="Draw steps 0 to N (default: the schedule's own horizon).")
@_new_schedule_options
@click.option("--json", "as_json", is_flag=True, help="Print ckpttool.plot/1 JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def plot(source, output, steps, spec, sets, lrs, scale_lr, optimizer, as_json, quiet) -> int:
    """Plot the lr of each param group over the whole run, the current step marked: the
    stored schedule stepped with real torch, and the new one dashed when --scheduler, --set,
    --lr or --scale-lr give one (as reschedule would make it).

    \b
    Example:
      ckpttool plot fixtures/adamw_cosine.pt
      ckpttool plot run.pt -o lr.png --set T_max=4000
    """
    import shutil

    from ckpttool import plot as core
    from ckpttool import render

    if output:
        core.require_matplotlib()
    series = core.plot_series(source, scheduler=spec, sets=sets, lr=lrs, scale_lr=scale_lr,
                              optimizer=optimizer, steps=steps,
                              progress=None if quiet else _progress_bar("replaying"))
    if output:
        core.draw_png(series, output)
        _note(f"wrote {output}")
    if as_json:
        click.echo(render.dumps(series.to_dict()))
    elif not output:  # a terminal's width, or 80 columns for a pipe
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 80
        click.echo(render.plot_text(series, width), nl=False)
    return EXIT_OK


def _note(message: str) -> None:
    click.echo(f"ckpttool: {message}", err=True)


def _progress_bar(label: str):
    """A progress callback drawing a bar on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None
    state: dict = {}

    def update(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None and total >= 100_000:
            bar = state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr)
            bar.__enter__()
        if bar is not None:
            bar.update(done - bar.pos)
            if done >= total:
                bar.__exit__(None, None, None)
                state.pop("bar")

    return update


def main() -> None:
    """Console-script entry point."""
    cli.main()
