"""The ``ckpttool`` command line: parse flags, call the library, render, exit.

Library errors become one line on stderr (``ckpttool: error: ...``) and exit code 2 here and
only here; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import textwrap
import time
import traceback

import click

from ckpttool import __version__
from ckpttool.errors import EXIT_DIFFERENT, EXIT_ERROR, EXIT_OK, CkptToolError


class _Group(click.Group):
    """A click group that turns every failure into one line and a documented exit code."""

    def main(self, args=None, prog_name=None, **extra):
        args = list(sys.argv[1:] if args is None else args)
        # --debug is the group's option, taken anywhere before a `--` (`ckpttool show --debug
        # X` as well as `ckpttool --debug show X`).
        end = args.index("--") if "--" in args else len(args)
        debug = "--debug" in args[:end]
        if debug:
            args = ["--debug"] + [a for a in args[:end] if a != "--debug"] + args[end:]
        # A path that is not UTF-8 (its bytes as surrogates) is printed as its bytes, as ls
        # does, under any locale (Python's own default for it depends on the locale).
        if getattr(sys.stdout, "errors", None) == "strict":
            with contextlib.suppress(AttributeError, ValueError):
                sys.stdout.reconfigure(errors="surrogateescape")
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
        except (_Interrupted, KeyboardInterrupt):
            if sys.stderr.isatty():  # past the ^C the terminal shows
                click.echo(err=True)
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
        except KeyboardInterrupt:  # (click's own handler would print an empty line first)
            raise _Interrupted() from None
        except BrokenPipeError:
            # The reader went away (`ckpttool show ... | head -1`): it has all it wanted. (Here,
            # before click's own handler, which would exit 1.)
            _silence_stdout()
            return EXIT_OK


class _Interrupted(Exception):
    """Ctrl-C, on its way from a command to :meth:`_Group.main` past click's handler."""


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
    _end_bars()
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


def _trust_option(command):
    """--trust: read checkpoints whose pickle calls code-running globals (os.system, eval, ...)
    instead of refusing them, list the calls among the findings, and warn on stderr once for
    each such file (see serialization.trusting). Nothing from the file runs, even then."""

    @functools.wraps(command)
    def run(*args, trust: bool = False, **kwargs):
        if not trust:
            return command(*args, **kwargs)
        from ckpttool.serialization import name_calls
        from ckpttool.serialization import trusting

        with trusting() as trusted:
            try:
                return command(*args, **kwargs)
            finally:
                warned: set[tuple[str, ...]] = set()
                for path, calls in trusted:
                    if tuple(calls) not in warned:  # (an output holds the input's calls too)
                        warned.add(tuple(calls))
                        _note(f"warning: --trust: {path} calls {name_calls(calls)}; ckpttool "
                              "ran none of it, but torch.load(weights_only=False) of this file "
                              "(or of what ckpttool writes from it) runs it")

    return click.option("--trust", is_flag=True,
                        help="Read a checkpoint whose pickle calls code (os.system, eval, ...) "
                             "instead of refusing it; the calls are listed, never run.")(run)


@cli.command()
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True,
              help="Print ckpttool.show/1 JSON (a list of them for several checkpoints).")
@click.option("--verify", is_flag=True,
              help="Replay each schedule with real torch and say whether the stored state is "
                   "bit-identical to a clean run (imports torch; an HF Trainer folder's "
                   "schedule through transformers, its logged lrs checked too).")
@click.option("--full", is_flag=True,
              help="With several checkpoints: the full report of each, not one summary table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_trust_option
def show(paths: tuple[str, ...], as_json: bool, verify: bool, full: bool, quiet: bool) -> int:
    """Show the optimizer and scheduler state of checkpoints: per-group lr and initial_lr,
    scheduler class, step and arguments, and findings that would break a resume.

    Reads no tensor data and runs no code from the file. A PATH may be a folder of runs
    (searched for *.pt, *.pth, *.ckpt, *.bin) or a pattern. Several checkpoints give one
    summary table (--full: a report each; --json: a list); any that fails is reported and the
    exit code is 2.

    \b
    Example:
      ckpttool show fixtures/adamw_cosine.pt
      ckpttool show --json --verify run/ckpt.pt
      ckpttool show runs/            # a summary table of every checkpoint under runs/
    """
    from ckpttool import batch, inspection, render

    found = batch.expand_paths(paths)
    if len(paths) == 1 and not found[0].expanded:  # one checkpoint: its report
        ckpt = inspection.load(found[0].path, verify=verify,
                               progress=_progress_bar("verifying", quiet=quiet) if verify
                               else None)
        click.echo(render.dumps(render.show_dict(ckpt)) if as_json else render.show_text(ckpt),
                   nl=as_json)
        return EXIT_OK
    streaming = full and not as_json  # reports as they come; else all at the end, with a bar
    progress = None if streaming else _progress_bar("reading", quiet=quiet, minimum=2,
                                                    delay=BAR_DELAY_S)
    outs, failed = [], 0
    for i, f in enumerate(found):
        try:
            ckpt = inspection.load(f.path, verify=verify)
            # Rendered here, so that a failure to render one PATH is that PATH's failure.
            if as_json:
                out = render.dumps(render.show_dict(ckpt))
            elif full:
                out = ("\n" if i else "") + render.show_text(ckpt)
            else:
                out = render.show_summary_row(ckpt)
        except Exception as e:  # with several PATHs one that fails, even by a bug, loses no other
            message = _batch_error(e, f.path)
            failed += 1
            if as_json:
                out = render.dumps({"schema": render.SHOW_SCHEMA, "path": f.path,
                                    "error": message})
            else:
                out = None if full else render.show_summary_failed_row(f.path)
        if streaming:
            if out is not None:
                click.echo(out, nl=False)
        else:
            outs.append(out)
        if progress is not None:
            progress(i + 1, len(found))
    if as_json:  # the same text json.dumps(indent=2) writes for the list, one document at a time
        click.echo("[\n" + ",\n".join(textwrap.indent(d, "  ") for d in outs) + "\n]")
    elif not full:
        click.echo(render.show_summary_text(outs, failed), nl=False)
    return EXIT_ERROR if failed else EXIT_OK


@cli.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--rtol", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="R",
              help="Relative tolerance: x equals y when |x-y| <= atol + rtol*|y|.")
@click.option("--atol", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="T",
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
@_trust_option
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
                          progress=_progress_bar("comparing", quiet=quiet,
                                                 minimum=BAR_MIN_BYTES))
    if as_json:
        click.echo(render.dumps(render.diff_dict(result, limit=limit)))
    else:
        click.echo(render.diff_text(result, limit=render.DIFF_LIMIT if limit is None else limit),
                   nl=False)
    return EXIT_OK if result.equal else EXIT_DIFFERENT


def _new_schedule_options(command):
    """--scheduler, --set, --lr, --scale-lr, --step, --momentum: the new schedule, the same for
    reschedule and plot (both hand them to rescheduling.reschedule), and --optimizer and
    --scheduler-state to choose whose."""
    for option in reversed([
        click.option("--scheduler", "spec", metavar="SPEC",
                     help="The new schedule: 'CosineAnnealingLR(T_max=2000)', or FILE.py:FUNC / "
                          "module:FUNC, a factory FUNC(optimizer) -> scheduler."),
        click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
                     help="Change one argument of the stored (or given) schedule; repeatable."),
        click.option("--lr", "lrs", multiple=True, metavar="[GROUP=]VALUE",
                     help="New base lr for every group, or for one group; repeatable."),
        click.option("--scale-lr", type=float, metavar="FACTOR", help="Multiply the base lrs."),
        click.option("--step", type=click.IntRange(min=0), metavar="N",
                     help="Resume position of the new schedule (default: the stored step)."),
        click.option("--momentum", type=float, metavar="VALUE",
                     help="Momentum / beta1 to leave when the old schedule cycled it."),
        click.option("--optimizer", "optimizer", metavar="LOCATION",
                     help="Which optimizer, when the checkpoint holds several (see `show`)."),
        click.option("--scheduler-state", "scheduler_state", metavar="LOCATION",
                     help="The stored scheduler state that drives it, when the file's pairing is "
                          "ambiguous or wrong (see `show`)."),
    ]):
        command = option(command)
    return command


@cli.command()
@click.argument("sources", metavar="IN...", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "output", type=click.Path(), metavar="OUT",
              help="Write the result here (one IN).")
@click.option("--out-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write each result to DIR/<name of IN> (any number of INs).")
@click.option("--in-place", is_flag=True,
              help="Rewrite each IN itself, keeping a backup: IN.bak (an HF Trainer folder: "
                   "bak-NAME, outside the Trainer's checkpoint-* rotation).")
@_new_schedule_options
@click.option("--device", metavar="DEV",
              help="Device for the recompute of tensor lrs (default: where saved).")
@click.option("--scheduler-key", default="scheduler", show_default=True, metavar="NAME",
              help="Key for the new scheduler state when the checkpoint has none.")
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@click.option("--force", is_flag=True,
              help="Overwrite an existing output (a file; an empty folder or a checkpoint folder "
                   "of the same kind) or backup.")
@click.option("--no-backup", is_flag=True, help="With --in-place: keep no backup.")
@click.option("--json", "as_json", is_flag=True,
              help="Print ckpttool.reschedule/1 JSON (a list of them for several INs).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--plot", "plot_path", type=click.Path(), metavar="FILE.png",
              help="Also draw the old and new lr curves, resume point marked (needs the [plot] "
                   "extra; one IN).")
@_trust_option
def reschedule(sources, output, out_dir, in_place, spec, sets, lrs, scale_lr, step, momentum,
               optimizer, scheduler_state, device, scheduler_key, dry_run, force, no_backup,
               as_json, quiet, plot_path) -> int:
    """Rewrite the schedule or learning rates of saved runs, resume-safely.

    The real torch scheduler is re-stepped to the resume step, so the output holds exactly what
    a run with the new schedule would hold there; tensor bytes are copied untouched. The output
    is re-read and verified before ckpttool says so. A checkpoint folder (HF Trainer
    checkpoint-N/, accelerate save_state(), torch.distributed.checkpoint) becomes a new
    folder, every file or shard not rewritten copied; for an HF folder it prints the
    TrainingArguments to resume with. Several INs (or a folder of runs, or a pattern) are each
    written atomically, with a summary at the end; if any fails, the others are still written
    and the exit code is 2.

    \b
    Example:
      ckpttool reschedule fixtures/adamw_cosine.pt -o longer.pt --set T_max=80
      ckpttool reschedule run.pt -o run2.pt --scheduler "OneCycleLR(max_lr=0.01, total_steps=4000)"
      ckpttool reschedule run.pt --in-place --scale-lr 0.5
      ckpttool reschedule run.pt --dry-run --set T_max=4000 --plot lr.png
      ckpttool reschedule sweep/ --out-dir sweep-halved/ --scale-lr 0.5
      ckpttool reschedule run/checkpoint-20 -o run2/checkpoint-20 --set num_training_steps=80
    """
    from ckpttool import batch, render
    from ckpttool.rescheduling import RESCHEDULE_SCHEMA

    if sum(map(bool, (output, out_dir, in_place))) > 1:
        raise click.UsageError("give exactly one of -o OUT, --out-dir DIR and --in-place")
    if not (dry_run or output or out_dir or in_place):
        raise click.UsageError("give exactly one of -o OUT, --out-dir DIR and --in-place "
                               "(or --dry-run)")
    found = batch.expand_paths(sources)
    many = len(sources) > 1 or found[0].expanded
    if many and output:
        raise click.UsageError("-o names one output; for several inputs use --out-dir DIR")
    if many and plot_path:
        raise click.UsageError("--plot draws the change of one input; plot the others with "
                               "`ckpttool plot IN --set ...`")
    targets = [f.path if in_place else output or (os.path.join(out_dir, f.name) if out_dir
                                                   else None) for f in found]
    batch.check_targets([f.path for f in found], targets, backups=in_place and not no_backup)
    if plot_path:
        from ckpttool import plot

        plot.require_matplotlib()  # before anything is written
    options = dict(scheduler=spec, sets=sets, lr=lrs, scale_lr=scale_lr, step=step,
                   device=device, optimizer=optimizer, scheduler_state=scheduler_state,
                   momentum=momentum, scheduler_key=scheduler_key)
    write = dict(in_place=in_place, dry_run=dry_run, force=force, backup=not no_backup,
                 make_folders=bool(out_dir))
    if not many:
        plan, saved = _reschedule_one(found[0].path, targets[0], options, **write,
                                      plot_path=plot_path,
                                      progress=_progress_bar("replaying", quiet=quiet),
                                      write_progress=_progress_bar("writing", quiet=quiet,
                                                                   minimum=BAR_MIN_COPY_BYTES))
        click.echo(render.dumps(render.reschedule_dict(plan, saved)) if as_json
                   else render.reschedule_text(plan, saved), nl=as_json)
        return EXIT_OK
    bar = _progress_bar("rescheduling", quiet=quiet, minimum=2, delay=BAR_DELAY_S)
    entries = []  # (input, output, plan or None, saved or None, JSON document)
    for i, (f, target) in enumerate(zip(found, targets)):
        try:
            plan, saved = _reschedule_one(f.path, target, options, **write)
            doc = render.reschedule_dict(plan, saved) if as_json else None
        except Exception as e:  # each input stands alone: nothing is left of a failed one
            message = _batch_error(e, f.path)
            plan = saved = None
            doc = {"schema": RESCHEDULE_SCHEMA, "path": f.path, "error": message}
        entries.append((f.path, target, plan, saved, doc))
        if bar is not None:
            bar(i + 1, len(found))
    if as_json:
        click.echo(render.dumps([doc for *_, doc in entries]))
    else:
        click.echo(render.reschedule_summary_text([e[:4] for e in entries], dry_run=dry_run),
                   nl=False)
    return EXIT_ERROR if any(plan is None for _, _, plan, _, _ in entries) else EXIT_OK


def _make_folders(folder: str) -> list[str]:
    """Create ``folder`` and its missing parents; return those created, outermost first."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    made = []
    try:
        for path in reversed(missing):
            os.mkdir(path)
            made.append(path)
    except OSError:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise
    return made


def _reschedule_one(source: str, target: str | None, options: dict, *, in_place: bool,
                    dry_run: bool, force: bool, backup: bool, make_folders: bool = False,
                    plot_path: str | None = None, progress=None, write_progress=None):
    """Plan, draw and write one reschedule: (plan, SaveResult or None). Whatever fails, nothing
    is left behind for this input: the staged copy is removed, the write is atomic, and the
    folders made for the output (``make_folders``: --out-dir) are removed again."""
    from ckpttool import inspection
    from ckpttool import rescheduling as core

    ckpt = inspection.load(source)
    if in_place and not dry_run and os.path.isfile(source) and not (
            os.stat(source).st_mode & 0o222):
        # Replacing it would succeed (renames need the folder writable, not the file), which is
        # not what a read-only file asks for.
        raise CkptToolError(f"{source} is read-only; make it writable (chmod u+w) to rewrite "
                            "it in place, or write a rescheduled copy with -o OUT")
    option = "--out-dir" if make_folders else "-o"  # the option that named target
    staged, made = None, []
    try:
        if in_place:  # (a dry run too: say now what the real run would refuse)
            core.check_in_place(ckpt)
        if not dry_run:
            if make_folders:
                made = _make_folders(os.path.dirname(target))
            # the big tensor records are copied while torch loads and the replay runs
            staged = core.start_output(ckpt, target, optimizer=options["optimizer"],
                                       scheduler_state=options["scheduler_state"], force=force,
                                       option=option)
        plan = core.reschedule(ckpt, progress=progress, **options)
        if plot_path:
            from ckpttool import plot

            plot.draw_png(plot.plan_series(plan, progress=progress), plot_path)
            _note(f"wrote {plot_path}")
        saved = None
        if not dry_run:
            saved = (plan.save_in_place(backup=backup, force=force, staged=staged,
                                        progress=write_progress) if in_place
                     else plan.save(target, force=force, staged=staged, progress=write_progress,
                                    option=option))
    except BaseException:
        if staged is not None:
            staged.abort()
        for folder in reversed(made):  # innermost first, each only if still empty
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    for warning in saved.warnings if saved is not None else ():
        _note(f"warning: {warning}")  # the output is written and verified; this is left over
    return plan, saved


@cli.command()
@click.argument("source", metavar="PATH", type=click.Path())
@click.option("-o", "--output", "output", type=click.Path(), metavar="FILE.png",
              help="Draw a PNG here (needs the [plot] extra); without it, sparklines.")
@click.option("--steps", type=click.IntRange(min=1), metavar="N",
              help="Draw steps 0 to N (default: the schedule's own horizon).")
@_new_schedule_options
@click.option("--json", "as_json", is_flag=True, help="Print ckpttool.plot/1 JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_trust_option
def plot(source, output, steps, spec, sets, lrs, scale_lr, step, momentum, optimizer,
         scheduler_state, as_json, quiet) -> int:
    """Plot the lr of each param group over the whole run, the current step marked: the
    stored schedule stepped with real torch, and the new one dashed when --scheduler, --set,
    --lr, --scale-lr, --step or --momentum give one (as reschedule would make it).

    \b
    Example:
      ckpttool plot fixtures/adamw_cosine.pt
      ckpttool plot run.pt -o lr.png --set T_max=4000
      ckpttool plot run.pt --scheduler "CosineAnnealingLR(T_max=4000)" --step 1000
    """
    import shutil

    from ckpttool import plot as core
    from ckpttool import render

    if output:
        core.require_matplotlib()
    series = core.plot_series(source, scheduler=spec, sets=sets, lr=lrs, scale_lr=scale_lr,
                              step=step, momentum=momentum, optimizer=optimizer,
                              scheduler_state=scheduler_state, steps=steps,
                              progress=_progress_bar("replaying", quiet=quiet))
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
    _end_bars()
    click.echo(f"ckpttool: {message}", err=True)


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


def _batch_error(e: Exception, path: str) -> str:
    """Report the failure of one of many inputs (one line; with --debug the traceback) and
    return its message, which names the input."""
    if _debug():
        traceback.print_exc()
    if isinstance(e, CkptToolError):
        message = str(e)
    elif isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        message = f"{where}{e.strerror or e}; nothing was written for it"
    else:
        message = _internal_error(e)
    if not message.startswith(path):
        message = f"{path}: {message}"
    _error(message)
    return message


# Progress bars go to stderr, only when it is a terminal and --quiet is not given, and only for
# work long enough to want one:
BAR_MIN_STEPS = 100_000  # a replay of this many steps (a fraction of a second of stepping)
BAR_MIN_BYTES = 64 << 20  # bytes compared
# An output written by copying this many bytes: a second or more on a network filesystem or a
# disk (an SSD copies it in a few tenths of a second; the bar is then brief).
BAR_MIN_COPY_BYTES = 256 << 20
BAR_DELAY_S = 1.0  # a batch over many inputs, once it has run this long
_live_bars: list = []  # bars being drawn, ended before any message line


def _progress_bar(label: str, *, quiet: bool = False, minimum: int = BAR_MIN_STEPS,
                  delay: float = 0.0):
    """A progress callback ``update(done, total)`` drawing a bar on stderr once ``total`` is at
    least ``minimum`` and ``delay`` seconds have passed; None with --quiet or when stderr is not
    a terminal (a log file or a pipe gets no bar). A ``total`` corrected on the way (a copy's
    estimate made exact) rescales the bar."""
    if quiet or not sys.stderr.isatty():
        return None
    start = time.monotonic()
    state: dict = {}

    def update(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is not None and bar not in _live_bars:  # a message ended its line: a new bar
            bar = None
        if bar is None:
            if total < minimum or done >= total or time.monotonic() - start < delay:
                return
            bar = state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr)
            bar.__enter__()
            _live_bars.append(bar)
        bar.length = total
        bar.update(done - bar.pos)
        if done >= total:
            state.pop("bar")
            _end_bars()

    return update


def _end_bars() -> None:
    """Finish the line of any bar being drawn, so that a message starts on a line of its own."""
    while _live_bars:
        _live_bars.pop().__exit__(None, None, None)


# True in the ``ckpttool`` process (set by main()): ckpttool.schedule may then adapt torch for
# the whole process (schedule.defer_dynamo), which the library never does to its callers.
RUNNING = False


def main() -> None:
    """Console-script entry point."""
    global RUNNING
    RUNNING = True
    try:
        cli.main()
    finally:
        # The process ends here: spare it the collector's last pass over every object torch
        # made (0.4 s of CPU after a replay); atexit handlers and flushing still run.
        gc.freeze()
