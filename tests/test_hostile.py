"""Hostile pickles, written opcode by opcode: never executed, reported by name, bounded.

Each payload would create a canary file when the checkpoint is loaded the usual way (the test
proves it: the same files are loaded for real, in a child process, and every live payload's
canary appears). Through ckpttool, in every container a checkpoint can hide a pickle in (a
torch zip, a legacy file, a bare pickle, a DCP ``.metadata`` and a DCP bytes entry, an HF
``training_args.bin``, and nested deep inside an ordinary state), no canary ever appears, the
command ends with one line naming the call, and nothing is written. Memo bombs, recursion
bombs, "billion laughs" and huge declared sizes end in bounded time and memory.
"""

from __future__ import annotations

import copyreg
import io
import itertools
import json
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckpttool.cli import cli

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

# --- writing pickles by hand -------------------------------------------------------------------


def text(value: str) -> bytes:
    """A str, as BINUNICODE."""
    raw = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def glob(module: str, name: str, *, stack: bool = False) -> bytes:
    """A global: GLOBAL (protocol 0-3), or STACK_GLOBAL from two strings (protocol 4+)."""
    if stack:
        return text(module) + text(name) + pickle.STACK_GLOBAL
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def call(callable_: bytes, *args: bytes) -> bytes:
    """callable(*args) by REDUCE."""
    return callable_ + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def dict_of(*items: bytes) -> bytes:
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(items) + pickle.SETITEMS


def whole(body: bytes, protocol: int = 2) -> bytes:
    return pickle.PROTO + bytes([protocol]) + body + pickle.STOP


# --- payloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """A pickle expression that would create ``canary`` when unpickled for real (``live``), and
    the dotted names ckpttool must report it by (any one of them)."""

    name: str
    build: object  # (canary: str) -> bytes
    names: tuple[str, ...]
    live: bool = True
    protocol: int = 2
    needs: str | None = None  # a module the real load imports (torch, numpy)


def _touch(canary: str) -> bytes:
    return text(f"touch {canary}")


def _getattr_chain(canary: str, importer: bytes) -> bytes:
    # getattr(<os module>, "system")("touch ...")
    system = call(glob("builtins", "getattr"), importer, text("system"))
    return system + pickle.MARK + _touch(canary) + pickle.TUPLE + pickle.REDUCE


def _build_setstate(canary: str) -> bytes:
    # An instance gets __setstate__ = os.system as an attribute (BUILD with slot state), and a
    # second BUILD calls it with the command: BUILD runs inst.__setstate__(state).
    obj = glob("types", "SimpleNamespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
    slots = pickle.NONE + dict_of(text("__setstate__"), glob("posix", "system")) + pickle.TUPLE2
    return obj + slots + pickle.BUILD + _touch(canary) + pickle.BUILD


PAYLOADS = [
    Payload("global-reduce", lambda c: call(glob("posix", "system"), _touch(c)),
            ("posix.system",)),
    Payload("stack-global", lambda c: call(glob("os", "system", stack=True), _touch(c)),
            ("os.system",), protocol=4),
    Payload("inst", lambda c: pickle.MARK + _touch(c) + pickle.INST + b"os\nsystem\n",
            ("os.system",)),
    Payload("obj", lambda c: pickle.MARK + glob("posix", "system") + _touch(c) + pickle.OBJ,
            ("posix.system",)),
    Payload("newobj", lambda c: glob("subprocess", "Popen") + pickle.MARK
            + text("touch") + text(c) + pickle.LIST + pickle.TUPLE1 + pickle.NEWOBJ,
            ("subprocess.Popen",), live=False),  # __new__ alone runs nothing
    Payload("newobj-ex", lambda c: glob("subprocess", "Popen", stack=True) + pickle.EMPTY_TUPLE
            + dict_of(text("args"), text(c)) + pickle.NEWOBJ_EX,
            ("subprocess.Popen",), live=False, protocol=4),
    Payload("popen", lambda c: call(glob("subprocess", "Popen"),
                                    pickle.MARK + text("touch") + text(c) + pickle.LIST),
            ("subprocess.Popen",)),
    Payload("build-setstate", _build_setstate, ("posix.system",)),
    Payload("eval", lambda c: call(glob("builtins", "eval"),
                                   text(f"__import__('os').system('touch {c}')")),
            ("builtins.eval",)),
    Payload("exec", lambda c: call(glob("builtins", "exec"),
                                   text(f"import os; os.system('touch {c}')")),
            ("builtins.exec",)),
    Payload("getattr-import", lambda c: _getattr_chain(
        c, call(glob("builtins", "__import__"), text("os"))),
            ("builtins.getattr", "builtins.__import__")),
    Payload("importlib", lambda c: _getattr_chain(
        c, call(glob("importlib", "import_module"), text("os"))),
            ("builtins.getattr", "importlib.import_module")),
    Payload("torch-save", lambda c: call(glob("torch", "save"), text("x"), text(c)),
            ("torch.save",), needs="torch"),
    Payload("torch-load", lambda c: call(glob("torch", "load"), text(c + ".inner")),
            ("torch.load",), live=False),
    Payload("numpy-save", lambda c: call(glob("numpy", "save"), text(c), pickle.NONE),
            ("numpy.save",), needs="numpy"),
    Payload("numpy-tofile", lambda c: call(glob("numpy", "savetxt"), text(c),
                                           pickle.EMPTY_LIST),
            ("numpy.savetxt",), needs="numpy"),
    Payload("memo-hidden", lambda c: glob("posix", "system") + pickle.BINPUT + b"\x07"
            + pickle.POP + dict_of(text("a"), pickle.BINGET + b"\x07" + _touch(c)
                                   + pickle.TUPLE1 + pickle.REDUCE),
            ("posix.system",)),
]
PAYLOAD_IDS = [p.name for p in PAYLOADS]


def nested(body: bytes, depth: int = 60) -> bytes:
    """``body`` deep inside an ordinary-looking state: dicts, lists and an opaque object's
    BUILD state, alternating."""
    for level in range(depth):
        if level % 3 == 0:
            body = dict_of(text(f"k{level}"), body)
        elif level % 3 == 1:
            body = pickle.MARK + body + pickle.LIST
        else:
            body = (glob("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
                    + dict_of(text("cfg"), body) + pickle.BUILD)
    return body


# A benign optimizer state around the payload, so that a reader that stopped at the first
# unknown global would still find something to show.
_STATE = dict_of(text("state"), pickle.EMPTY_DICT, text("param_groups"),
                 pickle.MARK + dict_of(text("lr"), pickle.BINFLOAT + struct.pack(">d", 0.1),
                                       text("params"), pickle.EMPTY_LIST) + pickle.LIST)


def state_with(payload: bytes, protocol: int = 2) -> bytes:
    return whole(dict_of(text("optimizer"), _STATE, text("extra"), payload), protocol)


# --- containers ---------------------------------------------------------------------------------


def torch_zip(data_pkl: bytes, prefix: str = "archive") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        zf.writestr(f"{prefix}/byteorder", "little")
        zf.writestr(f"{prefix}/version", "3\n")
    return out.getvalue()


def _legacy_parts() -> list[bytes]:
    """The five pickles of the legacy fixture, and its storages after them."""
    data = (FIXTURES / "legacy.pt").read_bytes()
    f = io.BytesIO(data)
    bounds = [0]
    for _ in range(5):
        _skip_pickle(f)
        bounds.append(f.tell())
    return [data[a:b] for a, b in itertools.pairwise(bounds)] + [data[bounds[-1]:]]


def _skip_pickle(f) -> None:
    import pickletools

    for op, _, _ in pickletools.genops(f):
        if op.name == "STOP":
            return


def legacy_file(obj_pickle: bytes) -> bytes:
    """A legacy torch file whose object is ``obj_pickle`` (no storages)."""
    parts = _legacy_parts()
    return b"".join(parts[:3]) + obj_pickle + whole(pickle.EMPTY_LIST)


def _dcp_copy(tmp: Path, name: str) -> Path:
    folder = tmp / name
    shutil.copytree(FIXTURES / "dirs" / "dcp" / "single", folder)
    return folder


def _metadata_plus(folder: Path, payload: bytes) -> None:
    """The real .metadata, with the payload run (and its result dropped) after the Metadata
    object is built: what torch.distributed.checkpoint's pickle.load would execute."""
    import pickletools

    data = (folder / ".metadata").read_bytes()
    ops = list(pickletools.genops(data))
    frames = [(pos, ops[i + 1][2]) for i, (op, _, pos) in enumerate(ops) if op.name == "FRAME"]
    for start, end in reversed(frames):  # frames count bytes: drop them, then append
        data = data[:start] + data[end:]
    assert data.endswith(pickle.STOP)
    (folder / ".metadata").write_bytes(data[:-1] + payload + pickle.POP + pickle.STOP)


def _bytes_entry_plus(folder: Path, key: str, entry_pickle: bytes) -> None:
    """The bytes entry ``key`` replaced by a torch zip of ``entry_pickle``, appended to the
    shard, and the .metadata pointing at it (rewritten with pickle: the committed fixture is
    trusted)."""
    import torch.distributed.checkpoint.filesystem  # noqa: F401  (the classes .metadata names)

    shard = folder / "__0_0.distcp"
    blob = torch_zip(entry_pickle)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(blob)
    with open(folder / ".metadata", "rb") as f:
        meta = pickle.load(f)
    index = next(i for i in meta.storage_data if i.fqn == key)
    info = meta.storage_data[index]
    meta.storage_data[index] = type(info)(info.relative_path, offset, len(blob))
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)


def _hf_copy(tmp: Path, name: str) -> Path:
    folder = tmp / name
    shutil.copytree(FIXTURES / "dirs" / "hf_trainer" / "checkpoint-20", folder)
    return folder


CONTAINERS = ["zip", "zip-nested", "legacy", "bare-pickle", "dcp-metadata", "dcp-bytes",
              "hf-training-args"]


def make_container(kind: str, payload: Payload, tmp: Path) -> tuple[Path, Path, str]:
    """Write ``payload`` into a checkpoint of this kind under ``tmp``: (the path to give
    ckpttool, the file a real load unpickles, how it loads it: "torch" or "pickle")."""
    canary = str(tmp / f"canary-{kind}-{payload.name}")
    body = payload.build(canary)
    proto = payload.protocol
    if kind in ("zip", "zip-nested"):
        path = tmp / f"{kind}-{payload.name}.pt"
        inner = nested(body) if kind == "zip-nested" else body
        path.write_bytes(torch_zip(state_with(inner, proto)))
        return path, path, "torch"
    if kind == "legacy":
        path = tmp / f"legacy-{payload.name}.pt"
        path.write_bytes(legacy_file(state_with(body, proto)))
        return path, path, "torch"
    if kind == "bare-pickle":
        path = tmp / f"bare-{payload.name}.pkl"
        path.write_bytes(whole(body, proto))
        return path, path, "pickle"
    if kind == "dcp-metadata":
        folder = _dcp_copy(tmp, f"dcp-meta-{payload.name}")
        _metadata_plus(folder, body)
        return folder, folder / ".metadata", "pickle"
    if kind == "dcp-bytes":
        folder = _dcp_copy(tmp, f"dcp-bytes-{payload.name}")
        _bytes_entry_plus(folder, "scheduler.last_epoch", whole(body, proto))
        return folder, folder, "dcp-entry"
    if kind == "hf-training-args":
        folder = _hf_copy(tmp, f"hf-{payload.name}")
        (folder / "training_args.bin").write_bytes(
            torch_zip(whole(dict_of(text("output_dir"), text("run"), text("x"), body), proto),
                      "training_args"))
        return folder, folder / "training_args.bin", "torch"
    raise ValueError(kind)


# --- the payloads are real -----------------------------------------------------------------------

_LOADER = textwrap.dedent("""
    import io, json, pickle, sys, time
    results = {}
    for path, how in json.loads(sys.argv[1]):
        try:
            if how == "pickle":
                with open(path, "rb") as f:
                    pickle.load(f)
            elif how == "torch":
                import torch
                torch.load(path, weights_only=False)
            else:  # a DCP bytes entry, as dcp.load reads it
                import torch, torch.distributed.checkpoint.filesystem
                with open(path + "/.metadata", "rb") as f:
                    meta = pickle.load(f)
                info = next(v for k, v in meta.storage_data.items()
                            if k.fqn == "scheduler.last_epoch")
                with open(path + "/" + info.relative_path, "rb") as f:
                    f.seek(info.offset)
                    torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
            results[path] = "loaded"
        except BaseException as e:
            results[path] = repr(e)[:200]
    time.sleep(0.5)  # Popen's child runs on its own
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory):
    """Every payload in every container, and proof that each live one runs on a real load."""
    tmp = tmp_path_factory.mktemp("hostile")
    made = {}
    for kind in CONTAINERS:
        for payload in PAYLOADS:
            made[kind, payload.name] = make_container(kind, payload, tmp)
    loads = [(str(real), how) for (kind, name), (_, real, how) in made.items()
             if next(p for p in PAYLOADS if p.name == name).live]
    proc = subprocess.run([sys.executable, "-c", _LOADER, json.dumps(loads)], cwd=tmp,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    missing = [f"{kind}/{payload.name}" for kind in CONTAINERS for payload in PAYLOADS
               if payload.live and not any(tmp.glob(f"canary-{kind}-{payload.name}*"))]
    assert not missing, f"payloads that do not run on a real load: {missing}"
    for canary in tmp.glob("canary-*"):
        canary.unlink()
    return tmp, made


def _one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stdout[-500:], result.stderr)
    assert len(lines) == 1 and lines[0].startswith("ckpttool: error: "), result.stderr
    assert "internal error" not in lines[0] and "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("kind", CONTAINERS)
def test_hostile_pickles_never_run_and_are_named(hostile_files, kind, tmp_path):
    tmp, made = hostile_files
    runner = CliRunner()
    clean = {"dcp-metadata": FIXTURES / "dirs/dcp/single",
             "dcp-bytes": FIXTURES / "dirs/dcp/single",
             "hf-training-args": FIXTURES / "dirs/hf_trainer/checkpoint-20"}.get(
        kind, FIXTURES / "adamw_cosine.pt")
    out = tmp_path / "out"
    out.mkdir()
    for payload in PAYLOADS:
        path = str(made[kind, payload.name][0])
        commands = [["show", path], ["show", "--json", path], ["diff", str(clean), path],
                    ["reschedule", path, "-o", str(out / "o.pt"), "--scale-lr", "0.5"]]
        if kind == "zip":
            commands.append(["reschedule", path, "--dry-run", "--scale-lr", "0.5"])
        for args in commands:
            line = _one_error_line(runner.invoke(cli, args))
            if args[0] == "show":
                assert any(name in line for name in payload.names), (payload.name, line)
                assert "nothing was executed" in line, line
        assert not list(tmp.glob("canary-*")), f"{kind}/{payload.name} ran"
        assert not list(out.iterdir())


def test_every_call_is_named(tmp_path):
    """A pickle with several code-running calls names each, not only the first."""
    body = dict_of(text("a"), call(glob("posix", "system"), text("true")),
                   text("b"), call(glob("builtins", "eval"), text("1")),
                   text("c"), call(glob("subprocess", "Popen"), text("true")))
    path = tmp_path / "many.pt"
    path.write_bytes(torch_zip(whole(body)))
    line = _one_error_line(CliRunner().invoke(cli, ["show", str(path)]))
    for name in ("posix.system", "builtins.eval", "subprocess.Popen"):
        assert name in line


@pytest.mark.parametrize("code", [pickle.EXT1 + b"\x07", pickle.EXT2 + b"\x07\x00",
                                  pickle.EXT4 + b"\x07\x00\x00\x00"], ids=["EXT1", "EXT2", "EXT4"])
def test_extension_codes_reach_no_global(tmp_path, code):
    """EXT1/2/4 fetch a global from copyreg's registry without find_class: refused whether or
    not someone in the process registered one (with posix.system registered, a real
    pickle.loads would run it)."""
    canary = tmp_path / "canary"
    body = whole(dict_of(text("x"), code + pickle.MARK + text(f"touch {canary}") + pickle.TUPLE
                         + pickle.REDUCE))
    path = tmp_path / "ext.pt"
    path.write_bytes(torch_zip(body))
    runner = CliRunner()
    _one_error_line(runner.invoke(cli, ["show", str(path)]))
    copyreg.add_extension("posix", "system", 7)
    try:
        pickle.loads(body)  # the payload is live: a real unpickler runs it
        assert canary.exists()
        canary.unlink()
        line = _one_error_line(runner.invoke(cli, ["show", str(path)]))
        assert "EXT1/2/4" in line
    finally:
        copyreg.remove_extension("posix", "system", 7)
    assert not canary.exists()


# --- bombs ----------------------------------------------------------------------------------------


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


def _bounded(args: list[str], *, seconds: float = 2.0, memory: int = 128 << 20) -> str:
    """Run a command in-process: one error line, within the time and peak-memory bounds."""
    rss, start = _peak_rss(), time.perf_counter()
    result = CliRunner().invoke(cli, args)
    took, grew = time.perf_counter() - start, _peak_rss() - rss
    line = _one_error_line(result)
    assert took < seconds, f"{took:.1f} s: {line}"
    assert grew < memory, f"{grew >> 20} MB: {line}"
    return line


@pytest.mark.parametrize("index", [0x8000000, 0xFFFFFFFF, 10**12])
def test_memo_index_bombs_are_refused_before_allocating(tmp_path, index):
    # the C unpickler grows its memo array to twice the largest index and zeroes it: 12 bytes
    # of pickle, 2 GB of memory for 0x8000000
    op = (pickle.LONG_BINPUT + struct.pack("<I", index) if index < 1 << 32
          else pickle.PUT + f"{index}\n".encode())
    path = tmp_path / "memo.pt"
    path.write_bytes(torch_zip(whole(pickle.NONE + op)))
    assert "memo index" in _bounded(["show", str(path)])


def test_get_of_a_missing_memo_entry(tmp_path):
    path = tmp_path / "get.pt"
    path.write_bytes(torch_zip(whole(dict_of(text("a"), pickle.LONG_BINGET + b"\x05\0\0\0"))))
    assert "corrupted" in _bounded(["show", str(path)])


_DEEP_BUILDERS = {
    "lists": lambda n: pickle.EMPTY_LIST * n + pickle.APPEND * (n - 1),
    "tuples": lambda n: pickle.NONE + pickle.TUPLE1 * n,
    "dicts": lambda n: (pickle.EMPTY_DICT + text("k")) * n + pickle.NONE
    + pickle.SETITEM * n,
    # a deep tuple as a dict key: hashing it recurses in C without a limit (a crash)
    "tuple-key": lambda n: pickle.EMPTY_DICT + pickle.NONE + pickle.TUPLE1 * n + pickle.NONE
    + pickle.SETITEM,
    "frozenset": lambda n: pickle.MARK + pickle.NONE + pickle.TUPLE1 * n + pickle.FROZENSET,
    "opaque-state": lambda n: (glob("m", "C") + pickle.EMPTY_TUPLE + pickle.NEWOBJ) * n
    + pickle.NONE + pickle.BUILD * n,
}

_CHILD = textwrap.dedent("""
    import json, sys, time
    from click.testing import CliRunner
    from ckpttool.cli import cli
    out = []
    for path in sys.argv[1:]:
        start = time.perf_counter()
        r = CliRunner().invoke(cli, ["show", path])
        out.append([r.exit_code, r.stderr, time.perf_counter() - start])
    print(json.dumps(out))
""")


@pytest.mark.parametrize("depth", [100_000, 1_000_000])
def test_recursion_bombs_end_cleanly(tmp_path, depth):
    """Nesting 1e5 and 1e6 deep, in every shape: one line each, no crash. (In a child
    process: a crash would otherwise take pytest with it.)"""
    paths = []
    for name, build in _DEEP_BUILDERS.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(torch_zip(whole(build(depth), 4)))
        paths.append(str(path))
    proc = subprocess.run([sys.executable, "-c", _CHILD, *paths], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, f"the child died ({proc.returncode}): {proc.stderr[-1000:]}"
    for name, (code, stderr, took) in zip(_DEEP_BUILDERS, json.loads(proc.stdout)):
        assert code == 2 and stderr.count("\n") == 1 and "nests" in stderr, (name, stderr)
        assert took < 10, (name, took)


def _laughs(kind: str, levels: int = 40) -> bytes:
    """Each level holds the previous one twice, by memo: 2**levels values, 3*levels objects."""
    make = {"list": (pickle.MARK, pickle.LIST), "tuple": (pickle.MARK, pickle.TUPLE),
            "dict": (pickle.MARK, pickle.DICT)}[kind]
    ops = [pickle.EMPTY_LIST, pickle.BINPUT + b"\x00"]
    for i in range(1, levels + 1):
        prev = pickle.BINGET + bytes([i - 1])
        items = prev + prev if kind != "dict" else text("a") + prev + text("b") + prev
        ops += [make[0], items, make[1], pickle.BINPUT + bytes([i])]
    return whole(b"".join(ops))


@pytest.mark.parametrize("kind", ["list", "tuple", "dict"])
def test_billion_laughs_are_refused_by_every_command(tmp_path, kind):
    path = tmp_path / "laughs.pt"
    path.write_bytes(torch_zip(_laughs(kind)))
    out = tmp_path / "out.pt"
    for args in (["show", str(path)], ["diff", str(path), str(path)],
                 ["reschedule", str(path), "-o", str(out), "--scale-lr", "0.5"]):
        assert "billion laughs" in _bounded(args)
    assert not out.exists()


@pytest.mark.parametrize("cls", ["OrderedDict", "Counter"])
def test_build_copying_one_state_again_and_again_is_refused(tmp_path, cls):
    """BUILD copies its state into an OrderedDict's attributes (torch's state dicts carry their
    _metadata so): one memoized 100,000-key state built into 200 of them was 800 MB from a
    1 MB pickle."""
    keys = b"".join(text(f"k{i}") + pickle.NONE for i in range(100_000))
    state = pickle.EMPTY_DICT + pickle.BINPUT + b"\x01" + pickle.MARK + keys + pickle.SETITEMS
    one = call(glob("collections", cls)) + pickle.BINGET + b"\x01" + pickle.BUILD
    path = tmp_path / "build.pt"
    path.write_bytes(torch_zip(whole(state + pickle.POP + pickle.MARK + one * 200
                                     + pickle.LIST)))
    assert "billion laughs" in _bounded(["show", str(path)], memory=200 << 20)
    # once is what torch does, and reads
    path.write_bytes(torch_zip(whole(dict_of(text("model"), call(glob("collections", cls))
                                             + dict_of(text("_metadata"), pickle.EMPTY_DICT)
                                             + pickle.BUILD))))
    assert CliRunner().invoke(cli, ["show", str(path)]).exit_code == 0


@pytest.mark.parametrize("op", [
    pickle.BINBYTES8 + struct.pack("<Q", 1 << 40),
    pickle.BINUNICODE8 + struct.pack("<Q", 1 << 62),
    pickle.BYTEARRAY8 + struct.pack("<Q", (1 << 64) - 1),
    pickle.BINBYTES + struct.pack("<I", 0xFFFFFFF0),
    pickle.BINUNICODE + struct.pack("<I", 0xFFFFFFF0),
    pickle.LONG4 + struct.pack("<i", 0x7FFFFFFF),
    pickle.FRAME + struct.pack("<Q", 1 << 40),
], ids=["BINBYTES8", "BINUNICODE8", "BYTEARRAY8", "BINBYTES", "BINUNICODE", "LONG4", "FRAME"])
@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_huge_declared_sizes(tmp_path, op, container):
    body = whole(dict_of(text("x"), op + b"abc"), 5)
    path = tmp_path / "huge.pt"
    path.write_bytes(torch_zip(body) if container == "zip" else legacy_file(body))
    line = _bounded(["show", str(path)], memory=64 << 20)
    assert "truncated" in line


def _tensor_state(numel: int, shape: tuple[int, ...]) -> bytes:
    """{"optimizer": {"state": {0: {"step": <a float32 tensor>}}, "param_groups": [...]}} with
    the storage's declared size and the tensor's shape as given (the record holds 4 bytes)."""
    storage = (pickle.MARK + text("storage") + glob("torch", "FloatStorage") + text("0")
               + text("cpu") + pickle.LONG1 + bytes([8]) + struct.pack("<q", numel)
               + pickle.TUPLE + pickle.BINPERSID)
    size = pickle.MARK + b"".join(pickle.LONG1 + bytes([8]) + struct.pack("<q", s)
                                  for s in shape) + pickle.TUPLE
    stride = pickle.MARK + b"".join(pickle.BININT1 + b"\x01" for _ in shape) + pickle.TUPLE
    tensor = call(glob("torch._utils", "_rebuild_tensor_v2"), storage, pickle.BININT1 + b"\0",
                  size, stride, pickle.NEWFALSE,
                  glob("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE)
    group = dict_of(text("lr"), pickle.BINFLOAT + struct.pack(">d", 0.1), text("betas"),
                    (pickle.BINFLOAT + struct.pack(">d", 0.9)) * 2 + pickle.TUPLE2,
                    text("eps"), pickle.BINFLOAT + struct.pack(">d", 1e-8),
                    text("weight_decay"), pickle.BINFLOAT + struct.pack(">d", 0.0),
                    text("amsgrad"), pickle.NEWFALSE, text("initial_lr"),
                    pickle.BINFLOAT + struct.pack(">d", 0.1),
                    text("params"), pickle.MARK + pickle.BININT1 + b"\0" + pickle.LIST)
    opt = dict_of(text("state"), dict_of(pickle.BININT1 + b"\0",
                                         dict_of(text("step"), tensor, text("exp_avg"), tensor)),
                  text("param_groups"), pickle.MARK + group + pickle.LIST)
    sched = dict_of(text("T_max"), pickle.BININT1 + b"\x14", text("eta_min"),
                    pickle.BINFLOAT + struct.pack(">d", 0.0), text("base_lrs"),
                    pickle.MARK + pickle.BINFLOAT + struct.pack(">d", 0.1) + pickle.LIST,
                    text("last_epoch"), pickle.BININT1 + b"\x00", text("_step_count"),
                    pickle.BININT1 + b"\x01", text("_last_lr"),
                    pickle.MARK + pickle.BINFLOAT + struct.pack(">d", 0.1) + pickle.LIST)
    return whole(dict_of(text("optimizer"), opt, text("scheduler"), sched))


@pytest.mark.parametrize("numel, shape", [
    (1 << 60, (1 << 60,)),  # a storage of 2**62 bytes, in a 4-byte record
    (1, (1 << 31, 1 << 31)),  # a tensor far larger than its storage
    (1 << 61, (1 << 30, 1 << 30, 1 << 1)),
], ids=["huge-storage", "tensor-past-storage", "huge-both"])
def test_huge_declared_tensors(tmp_path, numel, shape):
    """show reads no tensor bytes, so a storage record shorter than declared is found by the
    commands that read or copy it (diff, reschedule); a tensor larger than its storage is
    found on reading the pickle."""
    path = tmp_path / "big.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _tensor_state(numel, shape))
        zf.writestr("archive/data/0", b"\0\0\0\0")
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    good = tmp_path / "good.pt"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("archive/data.pkl", _tensor_state(1, (1,)))
        zf.writestr("archive/data/0", b"\0\0\0\0")
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    out = tmp_path / "out.pt"
    runner = CliRunner()
    show = runner.invoke(cli, ["show", str(path)])
    if numel >= 1 << 60:
        assert show.exit_code == 0, show.stderr
    else:
        assert "larger than its storage" in _one_error_line(show)
    other = runner.invoke(cli, ["diff", str(good), str(path)])  # shapes differ: no bytes read
    assert other.exit_code == 1 or "larger than its storage" in _one_error_line(other)
    for args in (["diff", str(path), str(path)],
                 ["reschedule", str(path), "-o", str(out), "--set", "T_max=40"]):
        line = _bounded(args, memory=64 << 20, seconds=5)
        assert "shorter" in line or "larger than its storage" in line, line
    assert not out.exists()


def _clean_or_fine(args: list[str]) -> int:
    """Run a command in-process: exit 0, or one error line; in bounded time and memory."""
    rss, start = _peak_rss(), time.perf_counter()
    result = CliRunner().invoke(cli, args)
    assert time.perf_counter() - start < 5 and _peak_rss() - rss < 64 << 20
    if result.exit_code != 0:
        _one_error_line(result)
    return result.exit_code


@pytest.mark.parametrize("record", [0, 5], ids=["data.pkl", "a-tensor-record"])
@pytest.mark.parametrize("field, value", [
    ("size", 0xFFFFFFFF), ("compressed", 0xFFFFFFFF), ("both", 0xFFFFFFFF),
    ("offset", 0xFFFFFFF0), ("size", 1 << 31),
])
def test_zip_records_declared_huge(tmp_path, record, field, value):
    """A central directory entry declaring a huge record (0xFFFFFFFF also means "see the zip64
    field", which is missing): every command ends cleanly and fast; a rewrite either refuses
    or writes a checkpoint that reads back."""
    data = bytearray((FIXTURES / "adamw_cosine.pt").read_bytes())
    central = data.find(b"PK\x01\x02")
    for _ in range(record):
        central = data.find(b"PK\x01\x02", central + 4)
    at = {"size": (24,), "compressed": (20,), "both": (20, 24), "offset": (42,)}[field]
    for offset in at:
        data[central + offset:central + offset + 4] = struct.pack("<I", value)
    path = tmp_path / "zip.pt"
    path.write_bytes(bytes(data))
    out = tmp_path / "out.pt"
    _clean_or_fine(["show", str(path)])
    _clean_or_fine(["diff", str(path), str(path)])
    if _clean_or_fine(["reschedule", str(path), "-o", str(out), "--set", "T_max=80"]) == 0:
        assert CliRunner().invoke(cli, ["show", str(out)]).exit_code == 0
    else:
        assert not out.exists()
    assert path.read_bytes() == bytes(data)


# --- --trust ------------------------------------------------------------------------------------


def test_trust_is_the_only_door_and_it_warns(tmp_path):
    """--trust reads a checkpoint the safe reader refuses for its calls, and says so on stderr;
    even then ckpttool runs nothing from it."""
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pt"
    path.write_bytes(torch_zip(state_with(call(glob("posix", "system"),
                                               text(f"touch {canary}")))))
    runner = CliRunner()
    assert runner.invoke(cli, ["show", str(path)]).exit_code == 2
    result = runner.invoke(cli, ["show", "--trust", str(path)])
    assert result.exit_code == 0, result.stderr
    warning = result.stderr.splitlines()
    assert len(warning) == 1 and warning[0].startswith("ckpttool: warning: --trust"), warning
    assert "posix.system" in warning[0]
    assert "posix.system" in result.stdout  # listed among the findings
    doc = json.loads(runner.invoke(cli, ["show", "--json", "--trust", str(path)]).stdout)
    assert any(f["code"] == "unsafe-pickle" for f in doc["findings"])
    assert not canary.exists()
