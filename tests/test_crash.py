"""Crash safety: ckpttool killed at any moment, a full disk, a read-only destination, Ctrl-C.

``reschedule`` runs as a real process on a 60 MB checkpoint (and on an HF Trainer folder with a
64 MB file) and is killed with SIGKILL: as the staged copy of the tensor records starts, right
after each rename the write makes (the process kills itself after that os call returns), and at
random moments. After each kill:

- the input is intact: the same bytes (``--in-place``: under its own name, always: the backup
  is a second link to it, and the new file takes its name in one rename);
- the output is absent, or complete: byte-identical to what an uninterrupted run writes;
- what is left is only ckpttool's hidden names (``.OUT.ckpttool-new``,
  ``..OUT.ckpttool-new.*.tmp``), and the next run to the same output succeeds and leaves none
  of them (it replaces the first and removes temporaries whose process is gone); a hidden
  pending folder makes the next folder rewrite refuse, saying what to do.

After a handled error (a full disk, a read-only folder, Ctrl-C) nothing at all is left.
``CKPTTOOL_CRASH_RUNS=N`` adds N - 4 kills at random moments to each case (CI: none).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckpttool.cli import cli

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
RUNS = int(os.environ.get("CKPTTOOL_CRASH_RUNS", "4"))  # beyond 4: random moments
SET = ("--set", "T_max=80")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _start(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ckpttool", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpttool", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, check=False, **kwargs)


def _killed(args: list[str], when) -> int | None:
    """Run ckpttool and SIGKILL it at a moment: ``when`` is a delay in seconds, or a function
    of the time since the start that says when (polled every half millisecond). Returns its
    exit code if it ended first, else None."""
    proc = _start(*args)
    start = time.perf_counter()
    try:
        while proc.poll() is None:
            now = time.perf_counter() - start
            if (now >= when) if isinstance(when, float) else when():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return None
            time.sleep(0.0005)
        return proc.returncode
    finally:
        proc.stderr.close()


def _appears(path: Path):
    """A moment: as soon as ``path`` exists."""
    return lambda: os.path.lexists(path)


def _temporary_in(folder: Path):
    """A moment: as soon as a temporary file exists in ``folder`` (the staged copy runs)."""
    return lambda: any(n.endswith(".tmp") for n in os.listdir(folder))


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpttool: error: "), stderr
    assert "internal error" not in lines[0] and "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 60 MB checkpoint (model, AdamW state, CosineAnnealingLR), its digest, and the digest
    of what ``reschedule --set T_max=80`` makes of it (uninterrupted, in-process)."""
    import torch

    folder = tmp_path_factory.mktemp("big")
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4_000_000, generator=gen)),
              torch.nn.Parameter(torch.ones(1_000_000))]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    for p in params:
        p.grad = torch.ones_like(p)
    for _ in range(5):
        opt.step()
        sched.step()
    path = folder / "big.pt"
    torch.save({"model": {"w": params[0].data, "b": params[1].data},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path)
    ref = folder / "ref.pt"
    result = CliRunner().invoke(cli, ["reschedule", str(path), "-o", str(ref), *SET])
    assert result.exit_code == 0, result.stderr
    return path, _digest(path), _digest(ref)


# A real process dies by SIGKILL right after its n-th call of an os function returns: the
# durable steps of a write (each rename, each fsync) are then each a moment a kill can hit,
# which a kill at a random time (mostly landing in the torch import) rarely does.
_DIE_AFTER = """
import os, signal, sys
name, nth = sys.argv[1], int(sys.argv[2])
real, calls = getattr(os, name), [0]
def call(*args, **kwargs):
    result = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(os, name, call)
sys.argv = ["ckpttool", *sys.argv[3:]]
from ckpttool.cli import main
main()
"""


def _died_after(name: str, nth: int, args: list[str]) -> int:
    """Run ckpttool, killed by SIGKILL right after its ``nth`` call of ``os.<name>``; the exit
    code (-9 when it died there)."""
    proc = subprocess.run([sys.executable, "-c", _DIE_AFTER, name, str(nth), *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300, check=False)
    return proc.returncode


def _moments(seed: str, renames: list[int], copying: bool = True) -> list[tuple[str, object]]:
    """(what, when) to kill: as the staged copy starts (a temporary file appears), at random
    times (the CKPTTOOL_CRASH_RUNS beyond CI's 4), and right after each of ``renames``, in
    that order (the rename a write makes: the last kill leaves what the next run must
    handle)."""
    rng = random.Random(seed)
    return ([("copying", "copying")] if copying else []) + [
        (f"at {t:.2f} s", t) for t in (rng.uniform(0.0, 2.5) for _ in range(RUNS - 4))] + [
        (f"after rename {n}", ("replace", n)) for n in renames]


def _kill(args: list[str], when, folder: Path) -> int | None:
    if when == "copying":
        return _killed(args, _temporary_in(folder))
    if isinstance(when, tuple):
        code = _died_after(*when, args)
        assert code == -signal.SIGKILL, f"it did not die after {when} (exit {code})"
        return None
    return _killed(args, when)


def _only_ckpttool_names(folder: Path, target: str) -> None:
    """Hidden files a kill may leave: the pending file and the temporaries of its write."""
    left = [n for n in _hidden(folder) if n != f".{target}.ckpttool-new"
            and not n.startswith(f"..{target}.ckpttool-new.")]
    assert not left, left


def test_kill_9_during_reschedule_o(big, tmp_path):
    source, source_digest, ref_digest = big
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "out.pt"
    pending = folder / ".out.pt.ckpttool-new"
    args = ["reschedule", str(source), "-o", str(out), *SET]
    # renames: the written temporary file becomes the pending file (then verified), which
    # becomes the output. The temporaries of killed runs are left for the last run to remove.
    for what, when in _moments("o", renames=[2, 1]):
        out.unlink(missing_ok=True)
        pending.unlink(missing_ok=True)  # (what the previous kill left was checked)
        code = _kill(args, when, folder)
        assert _digest(source) == source_digest
        if out.exists():
            assert _digest(out) == ref_digest, f"an incomplete output after a kill {what}"
        else:
            assert code is None, f"exit {code} without an output"
        if what == "after rename 1":
            assert _digest(pending) == ref_digest and not out.exists()
        temporaries = [n for n in _hidden(folder) if n.endswith(".tmp")]
        if what == "copying":
            assert temporaries, "killed too late"
        elif what.startswith("after"):  # the temporary file a killed run left is gone
            assert not temporaries
        else:  # never more than the one this run may have left: they do not pile up
            assert len(temporaries) <= 1, temporaries
        _only_ckpttool_names(folder, "out.pt")
        assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} <= {"out.pt"}
    # The next run to the same output handles what the last kill left: its pending file is
    # replaced. (The temporary file of the run killed while copying was removed by the next
    # run: temporaries never pile up.)
    assert pending.exists()
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    assert _digest(out) == ref_digest and _hidden(folder) == []


def test_kill_9_during_reschedule_in_place(big, tmp_path):
    source, source_digest, ref_digest = big
    path = tmp_path / "run.pt"
    bak = tmp_path / "run.pt.bak"
    pending = tmp_path / ".run.pt.ckpttool-new"
    args = ["reschedule", str(path), "--in-place", *SET]
    # the temporary file becomes the pending file (rename 1); the backup is made as a second
    # link to the input (link 1); the pending file takes the input's name (rename 2), so the
    # input's name is never empty. (The copy itself is killed above, for -o.)
    moments = _moments("in-place", renames=[2], copying=False) + [
        ("after link 1", ("link", 1)), ("after rename 1", ("replace", 1))]
    for what, when in moments:
        shutil.copyfile(source, path)
        bak.unlink(missing_ok=True)
        pending.unlink(missing_ok=True)
        _kill(args, when, tmp_path)
        if path.exists():
            digest = _digest(path)
            assert digest in (source_digest, ref_digest), f"a damaged file after a kill {what}"
            if digest == ref_digest:  # rewritten: the original is the backup
                assert _digest(bak) == source_digest
            else:
                assert not bak.exists() or _digest(bak) == source_digest
        else:
            raise AssertionError(f"the input's name is empty after a kill {what}")
        _only_ckpttool_names(tmp_path, "run.pt")
    # The next run handles what the last kill left (a pending file, the input in place).
    assert pending.exists() and _digest(path) == source_digest and not bak.exists()
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    assert _digest(path) == ref_digest and _digest(bak) == source_digest
    assert _hidden(tmp_path) == []


def test_stale_temporaries_of_a_dead_process_are_removed_live_ones_kept(tmp_path):
    from ckpttool.serialization import _HOST_TAG, atomic_output

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.pt.{_HOST_TAG}-{dead.pid}-0123abcd.tmp"
    live = tmp_path / f".out.pt.{_HOST_TAG}-{os.getppid()}-0123abcd.tmp"
    other_host = tmp_path / f".out.pt.000000-{dead.pid}-0123abcd.tmp"
    other_target = tmp_path / f".out.pt.x.{_HOST_TAG}-{dead.pid}-0123abcd.tmp"
    for p in (stale, live, other_host, other_target):
        p.write_bytes(b"partial")
    with atomic_output(tmp_path / "out.pt") as f:
        f.write(b"new")
    assert (tmp_path / "out.pt").read_bytes() == b"new"
    assert not stale.exists()
    assert live.exists() and other_host.exists() and other_target.exists()


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _with_file_size_limit(limit: int, args: list[str]):
    """Run a command in-process with no file allowed past ``limit`` bytes (RLIMIT_FSIZE:
    writes fail with EFBIG, as on a full disk they fail with ENOSPC; Python ignores the
    signal that would otherwise kill it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        return CliRunner().invoke(cli, args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("mode", ["-o", "--in-place"])
def test_a_full_disk_is_one_line_and_leaves_nothing(big, tmp_path, mode):
    source, source_digest, _ = big
    path = tmp_path / "run.pt"
    shutil.copyfile(source, path)
    args = [str(path), "--in-place"] if mode == "--in-place" else [
        str(path), "-o", str(tmp_path / "out.pt")]
    result = _with_file_size_limit(8 << 20, ["reschedule", *args, *SET])
    assert result.exit_code == 2
    assert "nothing was written" in _one_error_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]
    assert _digest(path) == source_digest


def test_a_full_disk_in_a_real_process(big, tmp_path):
    source, source_digest, _ = big
    result = _run("reschedule", str(source), "-o", str(tmp_path / "out.pt"), *SET,
                  preexec_fn=_limit_file_size(8 << 20))
    assert result.returncode == 2
    assert "File too large" in _one_error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []
    assert _digest(source) == source_digest


def test_enospc_mid_write_in_process(big, tmp_path, monkeypatch):
    """ENOSPC itself, from the second write on, in-process (every write path: plain, direct
    and kernel copies)."""
    path = tmp_path / "run.pt"
    shutil.copyfile(big[0], path)
    written = [0]

    def failing(real):
        def call(*args, **kwargs):
            written[0] += 1
            if written[0] > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)

        return call

    for name in ("write", "pwrite", "copy_file_range", "sendfile", "writev"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, failing(getattr(os, name)))
    result = CliRunner().invoke(cli, ["reschedule", str(path), "-o", str(tmp_path / "out.pt"),
                                      *SET])
    monkeypatch.undo()
    assert result.exit_code == 2
    assert "No space left on device" in _one_error_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_a_read_only_destination_is_one_line(tmp_path):
    path = tmp_path / "run.pt"
    shutil.copyfile(FIXTURES / "adamw_cosine.pt", path)
    if os.geteuid() == 0:  # root writes through permission bits: a folder it cannot write
        folder = Path("/sys")
        if os.access(folder, os.W_OK) and not _unwritable(folder):
            pytest.skip("running as root, and no unwritable folder to try")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    try:
        result = CliRunner().invoke(cli, ["reschedule", str(path), "-o",
                                          str(folder / "ckpttool-out.pt"), *SET])
        assert result.exit_code == 2
        line = _one_error_line(result.stderr)
        assert "Permission denied" in line or "Read-only" in line, line
        assert not (folder / "ckpttool-out.pt").exists()
        mine = ["run.pt"] if folder == Path("/sys") else ["ro", "run.pt"]
        assert sorted(p.name for p in tmp_path.iterdir()) == mine
    finally:
        if folder != Path("/sys"):
            folder.chmod(0o755)


def _unwritable(folder: Path) -> bool:
    try:
        fd = os.open(folder / ".ckpttool-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except OSError:
        return True
    os.close(fd)
    os.unlink(folder / ".ckpttool-probe")
    return False


def test_in_place_in_a_read_only_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes through permission bits")
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "run.pt"
    shutil.copyfile(FIXTURES / "adamw_cosine.pt", path)
    before = path.read_bytes()
    folder.chmod(0o555)
    try:
        result = CliRunner().invoke(cli, ["reschedule", str(path), "--in-place", *SET])
        assert result.exit_code == 2
        assert "Permission denied" in _one_error_line(result.stderr)
        assert path.read_bytes() == before and sorted(os.listdir(folder)) == ["run.pt"]
    finally:
        folder.chmod(0o755)


def test_ctrl_c_during_a_long_replay_leaves_nothing(tmp_path):
    """SIGINT while 10,000,000 steps replay: exit 2, one line, nothing written or left."""
    path = tmp_path / "run.pt"
    shutil.copyfile(FIXTURES / "adamw_cosine.pt", path)
    out = tmp_path / "out.pt"
    proc = _start("reschedule", str(path), "-o", str(out), "--step", "10000000",
                  "--scheduler", "StepLR(step_size=1000)")
    time.sleep(3)  # torch imported (or being imported), the replay (about 17 s) to come
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    start = time.perf_counter()
    code = proc.wait(30)
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert time.perf_counter() - start < 5
    assert code == 2 and "interrupted" in _one_error_line(stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]
    assert path.read_bytes() == (FIXTURES / "adamw_cosine.pt").read_bytes()


# --- folder outputs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """An HF Trainer checkpoint folder with a 64 MB model.safetensors (copied byte for byte by
    a rewrite: the moment to kill), and what an uninterrupted rewrite makes of it."""
    import json
    import struct

    folder = tmp_path_factory.mktemp("hf") / "checkpoint-20"
    shutil.copytree(FIXTURES / "dirs" / "hf_trainer" / "checkpoint-20", folder)
    n = 16 << 20
    header = json.dumps({"big": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
                         "__metadata__": {"format": "pt"}}).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write(os.urandom(4 * n))
    ref = folder.parent / "ref"
    result = CliRunner().invoke(cli, ["reschedule", str(folder), "-o", str(ref), *FOLDER_SET])
    assert result.exit_code == 0, result.stderr
    return folder, _tree_digest(folder), _tree_digest(ref)


FOLDER_SET = ("--scheduler", "CosineAnnealingLR(T_max=40)")


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(folder.iterdir())}


def test_kill_9_during_a_folder_reschedule(big_folder, tmp_path):
    """A folder is written whole under a hidden pending name, then renamed: after a kill the
    output is absent or complete. A pending folder left behind may hold the only complete copy
    (a kill during --in-place), so the next run refuses to touch it and says what to do."""
    source, source_digest, ref_digest = big_folder
    out = tmp_path / "checkpoint-20"
    pending = tmp_path / ".checkpoint-20.ckpttool-new"
    args = ["reschedule", str(source), "-o", str(out), *FOLDER_SET]
    rng = random.Random("folder")
    moments = [("copying", _appears(pending / "model.safetensors")),
               ("after the rename", ("rename", 1)),
               *((f"at {t:.2f} s", t) for t in (rng.uniform(0, 2.5) for _ in range(RUNS - 4)))]
    refused = False
    for what, when in moments:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(pending, ignore_errors=True)
        code = _kill(args, when, tmp_path)
        assert _tree_digest(source) == source_digest
        if out.exists():
            assert _tree_digest(out) == ref_digest, f"incomplete after a kill {what}"
        else:
            assert code is None
        assert set(_hidden(tmp_path)) <= {pending.name}, _hidden(tmp_path)
        if pending.exists() and not refused:
            shutil.rmtree(out, ignore_errors=True)
            result = _run(*args)
            assert result.returncode == 2
            assert "interrupted ckpttool run" in _one_error_line(result.stderr)
            refused = True
    assert refused
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(pending, ignore_errors=True)
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    assert _tree_digest(out) == ref_digest and _hidden(tmp_path) == []


def test_a_full_disk_during_a_folder_reschedule(big_folder, tmp_path):
    source, source_digest, _ = big_folder
    out = tmp_path / "checkpoint-20"
    result = _with_file_size_limit(8 << 20, ["reschedule", str(source), "-o", str(out),
                                             *FOLDER_SET])
    assert result.exit_code == 2, result.stderr
    _one_error_line(result.stderr)
    assert list(tmp_path.iterdir()) == []
    assert _tree_digest(source) == source_digest
