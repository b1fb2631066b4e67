"""Mutation fuzzing: damaged copies of real fixtures through show, diff and reschedule.

Every mutant of a committed fixture (a torch zip, a legacy file, a Lightning .ckpt, HF Trainer
folder members, a DCP folder's ``.metadata`` and shard) goes through ``show``, ``show --json``,
``diff`` against the original, ``reschedule --dry-run`` and ``reschedule -o``. The only
acceptable outcomes (PRODUCT.md section 3): exit 0 or 1 (the mutant is still a valid
checkpoint; a written output is then complete and reads back), or exit 2 with exactly one
line on stderr, ``ckpttool: error: ...``, never an internal error; each command within a
time bound, the memory Python allocates for it bounded, and nothing written when it fails.

The mutations: bit flips and byte runs, truncation inside every region of a zip (local
headers, data, central directory, end record) or a legacy file, zip records swapped,
duplicated, renamed, dropped or given other sizes, central directory and end-record fields
overwritten, and pickle opcode mutations (replace, insert, delete, duplicate an opcode; another
integer, string or global name as an argument) with the zip re-packed correctly, so that the
damaged pickle is what gets read. A DCP ``.metadata`` is a bare pickle: its mutants are pickle
and byte mutants, plus entries pointing outside their shard.

The RNG is seeded, so a failure names a mutant that can be made again
(:func:`make_mutant`). CI runs a bounded number of mutants; ``CKPTTOOL_FUZZ=N`` runs N per seed
file (``python tests/bench/fuzz_long.py`` runs a long fuzz and keeps what it finds).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import pickletools
import random
import resource
import shutil
import struct
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

# Seconds one command may take on a mutant, and how much the process's peak resident memory
# may grow while the commands run on one mutant (memory a hostile size makes the reader touch;
# what is only reserved and never touched costs nothing). The fixtures are a few KB: a command
# on one takes milliseconds (reschedule: tens of ms, once torch is imported).
TIME_LIMIT_S = float(os.environ.get("CKPTTOOL_FUZZ_TIME_LIMIT", "2.0"))
MEMORY_LIMIT = 256 << 20


# --- seeds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    """A fixture to mutate: ``folder`` (copied whole) and the ``member`` mutated in it, or a
    single file (``member`` None); ``kind`` picks the mutations; ``reschedule`` the options a
    valid mutant is rescheduled with."""

    name: str
    path: str  # relative to fixtures/
    kind: str  # "zip", "legacy", "pickle" (a bare pickle file), "shard" (a .distcp)
    member: str | None = None
    reschedule: tuple[str, ...] = ("--scale-lr", "0.5")


SEEDS = [
    Seed("zip", "adamw_cosine.pt", "zip", reschedule=("--set", "T_max=80")),
    Seed("tensor-lr", "tensor_lr.pt", "zip", reschedule=("--set", "T_max=40")),
    Seed("legacy", "legacy.pt", "legacy", reschedule=("--set", "T_max=80")),
    Seed("lightning", "dirs/lightning/two_optimizers.ckpt", "zip",
         reschedule=("--optimizer", "optimizer_states/0", "--set", "T_max=40")),
    Seed("hf-optimizer", "dirs/hf_trainer/checkpoint-20", "zip", member="optimizer.pt"),
    Seed("hf-scheduler", "dirs/hf_trainer/checkpoint-20", "zip", member="scheduler.pt"),
    Seed("hf-args", "dirs/hf_trainer/checkpoint-20", "zip", member="training_args.bin"),
    Seed("dcp-metadata", "dirs/dcp/single", "pickle", member=".metadata"),
    Seed("dcp-shard", "dirs/dcp/two_ranks", "shard", member="__1_0.distcp"),
]


# --- mutations -----------------------------------------------------------------------------


def _flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


_SPECIAL_BYTES = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00\x00\x80", b"\xff\xff\xff\xff",
                  b"\xff\xff\xff\xff\xff\xff\xff\x7f", b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06",
                  b"\x80\x02", b".")


def _overwrite(data: bytes, rng: random.Random, start: int = 0, end: int | None = None) -> bytes:
    end = len(data) if end is None else end
    at = rng.randrange(start, max(start + 1, end))
    piece = (rng.choice(_SPECIAL_BYTES) if rng.random() < 0.6
             else rng.randbytes(rng.randint(1, 16)))
    return data[:at] + piece + data[at + len(piece):]


def zip_regions(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of a zip: each record's local header and data, the central directory and
    the end record."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    regions: dict[str, list[tuple[int, int]]] = {"header": [], "data": []}
    for info in zf.infolist():
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:
                                                       info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        regions["header"].append((info.header_offset, start))
        regions["data"].append((start, start + info.compress_size))
    end = data.rfind(b"PK\x05\x06")
    regions["central"] = [(zf.start_dir, end)]
    regions["end"] = [(end, len(data))]
    return regions


def _truncate_zip(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    region = rng.choice(("header", "data", "central", "end"))
    start, end = rng.choice(zip_regions(data)[region])
    return f"truncate-{region}", data[:rng.randrange(start, max(start + 1, end))]


def _damage_zip_region(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    region = rng.choice(("header", "central", "end"))
    start, end = rng.choice(zip_regions(data)[region])
    return f"overwrite-{region}", _overwrite(data, rng, start, end)


def _records(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def repack(records: list[tuple[str, bytes]]) -> bytes:
    """A zip of these records, stored as torch.save stores them (duplicates kept)."""
    out = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            for name, payload in records:
                zf.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), payload)
    return out.getvalue()


def _shuffle_records(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    records = _records(data)
    i, j = rng.randrange(len(records)), rng.randrange(len(records))
    how = rng.choice(("swap-names", "swap-order", "duplicate", "drop", "rename", "resize",
                      "rename-case", "slash-name"))
    name_i, payload_i = records[i]
    if how == "swap-names":
        records[i], records[j] = (records[j][0], payload_i), (name_i, records[j][1])
    elif how == "swap-order":
        records[i], records[j] = records[j], records[i]
    elif how == "duplicate":
        records.insert(j, (name_i, rng.choice((payload_i, rng.randbytes(len(payload_i))))))
    elif how == "drop":
        del records[i]
    elif how == "rename":
        prefix, _, rest = name_i.rpartition("/")
        records[i] = (rng.choice((f"{prefix}/x{rest}", f"other/{rest}", rest, f"{prefix}/data/99",
                                  f"{prefix}/data/{rng.randrange(100)}", "data.pkl")), payload_i)
    elif how == "rename-case":
        records[i] = (name_i.upper(), payload_i)
    elif how == "slash-name":
        records[i] = (rng.choice(("/" + name_i, name_i.replace("/", "//"), "../" + name_i,
                                  name_i + "/")), payload_i)
    else:  # another size: the tensor records torch's headers describe no longer fit
        records[i] = (name_i, payload_i[:rng.randrange(len(payload_i) + 1)]
                      if rng.random() < 0.5 else payload_i + rng.randbytes(rng.randint(1, 64)))
    return f"records-{how}", repack(records)


def _central_fields(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """Overwrite one field of a central directory entry or of the end record with a value at a
    boundary: sizes, offsets, counts, name lengths."""
    values = (0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, len(data), len(data) + 1)
    out = bytearray(data)
    if rng.random() < 0.3:
        end = data.rfind(b"PK\x05\x06")
        field, fmt = rng.choice(((8, "<H"), (10, "<H"), (12, "<I"), (16, "<I"), (20, "<H")))
        at = end + field
        label = f"end-field-{field}"
    else:
        starts = [i for i in range(len(data)) if data.startswith(b"PK\x01\x02", i)]
        entry = rng.choice(starts)
        field, fmt = rng.choice(((10, "<H"), (16, "<I"), (20, "<I"), (24, "<I"), (28, "<H"),
                                 (30, "<H"), (42, "<I"), (8, "<H")))
        at = entry + field
        label = f"central-field-{field}"
    size = struct.calcsize(fmt)
    value = rng.choice(values) & (0xFFFF if size == 2 else 0xFFFFFFFF)
    out[at:at + size] = struct.pack(fmt, value)
    return label, bytes(out)


# Opcodes with an argument made up for insertion or replacement: a palette of what a pickle
# can do, hostile globals and sizes included.
def _op_palette(rng: random.Random) -> bytes:
    global_names = [("posix", "system"), ("builtins", "eval"), ("collections", "OrderedDict"),
                    ("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage"),
                    ("builtins", "set"), ("torch", "device"), ("__main__", "Thing"),
                    ("collections", "Counter"), ("builtins", "bytearray"), ("_codecs", "encode"),
                    ("copyreg", "_reconstructor"), ("torch", "float32"), ("torch", "Size")]
    module, name = rng.choice(global_names)
    n = rng.choice((0, 1, 2, 255, 0x7FFFFFFF, 0xFFFFFFFF))
    memo = rng.choice((0, 1, 2, 5, 255, 10**6, 0xFFFFFFFF))
    text = rng.choice(("", "lr", "param_groups", "state", "x" * 300, "\udcff", "storage"))
    raw = text.encode("utf-8", "surrogatepass")
    choices = [
        pickle.MARK, pickle.POP, pickle.POP_MARK, pickle.DUP, pickle.EMPTY_LIST,
        pickle.EMPTY_DICT, pickle.EMPTY_TUPLE, pickle.EMPTY_SET, pickle.APPEND, pickle.APPENDS,
        pickle.SETITEM, pickle.SETITEMS, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2,
        pickle.TUPLE3, pickle.LIST, pickle.DICT, pickle.REDUCE, pickle.BUILD, pickle.NEWOBJ,
        pickle.NEWOBJ_EX, pickle.OBJ, pickle.STACK_GLOBAL, pickle.MEMOIZE, pickle.NONE,
        pickle.NEWTRUE, pickle.NEWFALSE, pickle.FROZENSET, pickle.ADDITEMS, pickle.BINPERSID,
        pickle.STOP, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER,
        pickle.INST + f"{module}\n{name}\n".encode(),
        pickle.GLOBAL + f"{module}\n{name}\n".encode(),
        pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode()
        + pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode() + pickle.STACK_GLOBAL,
        pickle.BINPUT + bytes([memo & 0xFF]), pickle.BINGET + bytes([memo & 0xFF]),
        pickle.LONG_BINPUT + struct.pack("<I", memo), pickle.LONG_BINGET + struct.pack("<I", memo),
        pickle.BININT1 + bytes([n & 0xFF]), pickle.BININT2 + struct.pack("<H", n & 0xFFFF),
        pickle.BININT + struct.pack("<I", n), pickle.LONG1 + b"\x08" + struct.pack("<q", -n),
        pickle.LONG4 + struct.pack("<i", rng.choice((1, 8, 10**5))) + b"\x01",
        pickle.BINFLOAT + struct.pack(">d", rng.choice((0.0, -0.0, float("nan"), float("inf"),
                                                        1e-3, 1e308))),
        pickle.SHORT_BINUNICODE + bytes([min(len(raw), 255)]) + raw[:255],
        pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw,
        pickle.BINUNICODE8 + struct.pack("<Q", rng.choice((len(raw), 1 << 62))) + raw,
        pickle.BINBYTES + struct.pack("<I", rng.choice((len(raw), 0xFFFFFFF0))) + raw,
        pickle.BINBYTES8 + struct.pack("<Q", rng.choice((len(raw), 1 << 40))) + raw,
        pickle.BYTEARRAY8 + struct.pack("<Q", rng.choice((len(raw), 1 << 40))) + raw,
        pickle.SHORT_BINBYTES + bytes([len(raw) & 0xFF]) + raw[:255],
        pickle.EXT1 + bytes([n & 0xFF]), pickle.EXT2 + struct.pack("<H", n & 0xFFFF),
        pickle.EXT4 + struct.pack("<I", n), pickle.PROTO + bytes([rng.choice((2, 4, 5, 9))]),
        pickle.FRAME + struct.pack("<Q", rng.choice((0, 8, 1 << 40))),
        pickle.INT + f"{rng.choice((n, -n, 10**30))}\n".encode(),
        pickle.LONG + b"9" * rng.choice((5, 5000)) + b"L\n",
        pickle.STRING + b"'abc'\n", pickle.UNICODE + b"abc\n", pickle.PERSID + b"0\n",
        pickle.PUT + f"{memo}\n".encode(), pickle.GET + f"{memo}\n".encode(),
        pickle.FLOAT + b"1e999\n",
    ]
    return rng.choice(choices)


def _ops(data: bytes) -> list[tuple[str, object, int, int]]:
    """(opcode name, argument, start, end) of each opcode of a pickle."""
    ops = list(pickletools.genops(data))
    out = []
    for k, (op, arg, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else pos + 1
        out.append((op.name, arg, pos, end))
    return out


_INT_OPS = {"BININT1": ("<B", 1), "BININT2": ("<H", 2), "BININT": ("<i", 4),
            "BINGET": ("<B", 1), "BINPUT": ("<B", 1), "LONG_BINGET": ("<I", 4),
            "LONG_BINPUT": ("<I", 4)}
_INT_VALUES = (0, 1, 2, 3, 7, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, -1, -(1 << 31))


def _unframed(data: bytes, ops: list) -> tuple[bytes, list]:
    """The pickle without its FRAME opcodes (protocol 4 frames say how many bytes follow, so
    any mutation that changes a length would end as "truncated", and nothing deeper would be
    exercised)."""
    frames = [(start, end) for name, _, start, end in ops if name == "FRAME"]
    for start, end in reversed(frames):
        data = data[:start] + data[end:]
    return data, _ops(data) if frames else ops


def mutate_pickle(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One opcode-level mutation of a well-formed pickle; the result may be malformed."""
    ops = _ops(data)
    if rng.random() < 0.9:
        data, ops = _unframed(data, ops)
    name, arg, start, end = rng.choice(ops[1:-1] or ops)  # PROTO and STOP stay, mostly
    how = rng.choice(("replace", "insert", "delete", "duplicate", "int", "int", "string",
                      "opcode-byte", "swap"))
    if how == "replace":
        return f"pickle-replace-{name}", data[:start] + _op_palette(rng) + data[end:]
    if how == "insert":
        return "pickle-insert", data[:start] + _op_palette(rng) + data[start:]
    if how == "delete":
        return f"pickle-delete-{name}", data[:start] + data[end:]
    if how == "duplicate":
        return f"pickle-duplicate-{name}", data[:end] + data[start:end] + data[end:]
    if how == "swap":
        name2, _, start2, end2 = rng.choice(ops[1:-1] or ops)
        if start2 < start:
            start, end, start2, end2 = start2, end2, start, end
        if start2 < end:
            return "pickle-swap", data
        return (f"pickle-swap-{name}-{name2}", data[:start] + data[start2:end2]
                + data[end:start2] + data[start:end] + data[end2:])
    if how == "int":
        ints = [o for o in ops if o[0] in _INT_OPS]
        if ints:
            name, arg, start, end = rng.choice(ints)
            fmt, size = _INT_OPS[name]
            value = rng.choice(_INT_VALUES + (arg + 1, arg - 1) if isinstance(arg, int) else ())
            bits = 8 * size
            value = value % (1 << bits) if fmt[1].isupper() else (
                (value + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1)))
            return f"pickle-int-{name}", data[:end - size] + struct.pack(fmt, value) + data[end:]
    if how == "string":
        texts = [o for o in ops if o[0] in ("SHORT_BINUNICODE", "BINUNICODE")]
        if texts:
            name, arg, start, end = rng.choice(texts)
            other = rng.choice([o[1] for o in texts] + ["", "posix", "system", "lr", "9",
                                                        "data.pkl", "/", "..", "x" * 1000])
            raw = other.encode()
            op = (pickle.SHORT_BINUNICODE + bytes([len(raw)]) if len(raw) < 256
                  else pickle.BINUNICODE + struct.pack("<I", len(raw)))
            return "pickle-string", data[:start] + op + raw + data[end:]
    # another opcode byte, the argument bytes left as they were
    byte = rng.choice([bytes([o.code.encode("latin-1")[0]]) for o in pickletools.opcodes])
    return f"pickle-opcode-byte-{name}", data[:start] + byte + data[start + 1:]


def _pickled_member(records: list[tuple[str, bytes]]) -> int:
    return next(i for i, (n, _) in enumerate(records) if n.endswith("/data.pkl"))


def _mutate_zip_pickle(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    records = _records(data)
    i = _pickled_member(records)
    label, pkl = mutate_pickle(records[i][1], rng)
    records[i] = (records[i][0], pkl)
    return label, repack(records)


def legacy_pickles(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the five pickles of a legacy torch file; the storages follow."""
    bounds, pos = [], 0
    for _ in range(5):
        end = pos
        for op, _, at in pickletools.genops(io.BytesIO(data[pos:])):
            if op.name == "STOP":
                end = pos + at + 1
                break
        bounds.append((pos, end))
        pos = end
    return bounds


def _mutate_legacy_pickle(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    bounds = legacy_pickles(data)
    which = rng.choice((3, 3, 3, 4, 2, 0))  # mostly the object itself
    start, end = bounds[which]
    label, pkl = mutate_pickle(data[start:end], rng)
    return f"legacy{which}-{label}", data[:start] + pkl + data[end:]


def _truncate_legacy(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    bounds = legacy_pickles(data)
    regions = bounds + [(bounds[-1][1], len(data))]
    which = rng.randrange(len(regions))
    start, end = regions[which]
    return f"truncate-legacy{which}", data[:rng.randrange(start, max(start + 1, end))]


def _truncate_anywhere(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    return "truncate", data[:rng.randrange(len(data))]


def _bytes_mutation(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    how = rng.choice(("flip", "flip", "overwrite", "insert", "delete"))
    if how == "flip":
        return "flip", _flip_bits(data, rng)
    if how == "overwrite":
        return "overwrite", _overwrite(data, rng)
    at = rng.randrange(len(data))
    if how == "insert":
        return "insert-bytes", data[:at] + rng.randbytes(rng.randint(1, 32)) + data[at:]
    return "delete-bytes", data[:at] + data[at + rng.randint(1, 32):]


def _shard_entry(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A shard is torch zips one after another: mutate the pickle of one of them in place
    when the mutation keeps its length (the .metadata offsets stay right), else flip bits."""
    starts = [i for i in range(len(data)) if data.startswith(b"PK\x03\x04", i)]
    at = rng.choice(starts)
    name_len = struct.unpack("<H", data[at + 26:at + 28])[0]
    name = data[at + 30:at + 30 + name_len]
    if not name.endswith(b"data.pkl"):
        return "shard-flip", _flip_bits(data, rng)
    extra_len = struct.unpack("<H", data[at + 28:at + 30])[0]
    size = struct.unpack("<I", data[at + 22:at + 26])[0]
    start = at + 30 + name_len + extra_len
    pkl = data[start:start + size]
    for _ in range(20):
        label, new = mutate_pickle(pkl, rng)
        if len(new) == len(pkl):
            crc = zlib.crc32(new)
            out = bytearray(data)
            out[start:start + size] = new
            out[at + 14:at + 18] = struct.pack("<I", crc)
            # the same CRC in the entry's central directory record
            central = data.find(b"PK\x01\x02", start + size)
            while central >= 0 and data[central + 46:central + 46 + name_len] != name:
                central = data.find(b"PK\x01\x02", central + 4)
            if central >= 0:
                out[central + 16:central + 20] = struct.pack("<I", crc)
            return f"shard-{label}", bytes(out)
    return "shard-flip", _flip_bits(data, rng)


_MUTATIONS = {
    "zip": [(_bytes_mutation, 2), (_truncate_zip, 2), (_damage_zip_region, 1),
            (_shuffle_records, 2), (_central_fields, 1), (_mutate_zip_pickle, 6)],
    "legacy": [(_bytes_mutation, 2), (_truncate_legacy, 2), (_mutate_legacy_pickle, 6)],
    "pickle": [(_bytes_mutation, 2), (_truncate_anywhere, 1), (mutate_pickle, 7)],
    "shard": [(_bytes_mutation, 2), (_truncate_anywhere, 1), (_shard_entry, 4)],
}


def make_mutant(seed: Seed, index: int, data: bytes) -> tuple[str, bytes]:
    """Mutant ``index`` of ``seed`` (deterministic): (what was done, the mutated bytes).
    One mutation, or two or three on top of each other."""
    rng = random.Random(f"{seed.name}/{index}")
    kinds = _MUTATIONS[seed.kind]
    labels = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        mutation = rng.choices([m for m, _ in kinds], [w for _, w in kinds])[0]
        try:
            label, data = mutation(data, rng)
        except Exception:  # earlier damage left nothing this mutation can parse
            label, data = "flip", _flip_bits(data, rng)
        labels.append(label)
        if not data:
            break
    return "+".join(labels), data


# --- running the commands ------------------------------------------------------------------


@dataclass
class Outcome:
    args: tuple[str, ...]
    code: int
    stderr: str
    seconds: float


def peak_rss() -> int:
    """The peak resident memory of this process so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Records(logging.Handler):
    """Log records of WARNING and above: a real process prints them on stderr (Python's
    last-resort handler), where pytest keeps them to itself."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def _run(runner: CliRunner, args: list[str]) -> Outcome:
    """One command in-process; what a real process would print on stderr besides click's
    stderr (Python warnings, log records) is added to it."""
    from ckpttool.cli import cli

    records = _Records()
    logging.getLogger().addHandler(records)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = runner.invoke(cli, args, catch_exceptions=True)
    finally:
        logging.getLogger().removeHandler(records)
    seconds = time.perf_counter() - start
    stderr = result.stderr + "".join(
        f"{w.category.__name__}: {w.message}\n" for w in caught) + "".join(
        line + "\n" for line in records.lines)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        stderr += "".join(traceback.format_exception(result.exception))
    return Outcome(tuple(args), result.exit_code, stderr, seconds)


def problems(outcome: Outcome, *, may_differ: bool = False) -> list[str]:
    """What is wrong with one command's outcome on a mutant (empty: all is well)."""
    out = []
    allowed = (0, 1, 2) if may_differ else (0, 2)
    if outcome.code not in allowed:
        out.append(f"exit code {outcome.code}")
    lines = outcome.stderr.splitlines()
    if outcome.code == 2:
        if len(lines) != 1 or not lines[0].startswith("ckpttool: error: "):
            out.append(f"stderr is not one error line: {outcome.stderr[-2000:]!r}")
        elif "internal error" in lines[0]:
            out.append(lines[0])
    if "Traceback" in outcome.stderr:
        out.append(f"a traceback: {outcome.stderr[-2000:]}")
    if outcome.seconds > TIME_LIMIT_S:
        out.append(f"took {outcome.seconds:.2f} s")
    return out


class Workspace:
    """A copy of one seed's fixture under ``tmp``, where mutants are put in place of the
    original member one after another, and an empty output folder per reschedule."""

    def __init__(self, seed: Seed, tmp: Path):
        self.seed = seed
        source = FIXTURES / seed.path
        self.original = source  # diffed against: the untouched fixture
        if seed.member is None:
            self.target = tmp / f"mutant{source.suffix}"
            self.data = source.read_bytes()
            self.path = self.target
        else:
            self.path = tmp / "mutant"
            shutil.copytree(source, self.path)
            self.target = self.path / seed.member
            self.data = self.target.read_bytes()
        self.out_dir = tmp / "out"
        self.out_dir.mkdir()

    def put(self, data: bytes) -> None:
        self.target.write_bytes(data)

    def restore(self) -> None:
        self.target.write_bytes(self.data)


def check_mutant(ws: Workspace, runner: CliRunner, index: int, *,
                 reschedule: bool = True) -> list[str]:
    """Run every command on mutant ``index`` of the workspace's seed; the problems found,
    each prefixed with the mutant and the command."""
    label, data = make_mutant(ws.seed, index, ws.data)
    ws.put(data)
    rss = peak_rss()
    found: list[str] = []
    path, original = str(ws.path), str(ws.original)
    runs = [(["show", path], False), (["show", "--json", path], False),
            (["diff", original, path], True)]
    if reschedule:
        runs.append((["reschedule", path, "--dry-run", *ws.seed.reschedule], False))
    for args, may_differ in runs:
        outcome = _run(runner, args)
        found += [f"{' '.join(args[:2])}: {p}" for p in problems(outcome, may_differ=may_differ)]
    if reschedule:
        out = ws.out_dir / ("out" + (Path(ws.seed.path).suffix or ""))
        args = ["reschedule", path, "-o", str(out), *ws.seed.reschedule]
        outcome = _run(runner, args)
        found += [f"reschedule -o: {p}" for p in problems(outcome)]
        left = sorted(p.name for p in ws.out_dir.iterdir())
        if outcome.code != 0 and left:
            found.append(f"reschedule -o failed and left {left}")
        if outcome.code == 0:
            back = _run(runner, ["show", str(out)])
            if back.code != 0:
                found.append(f"reschedule -o wrote an output show cannot read: {back.stderr}")
        for p in ws.out_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if ws.target.read_bytes() != data:
        found.append("the input changed")
    if peak_rss() - rss > MEMORY_LIMIT:
        found.append(f"the peak memory grew by {(peak_rss() - rss) >> 20} MB")
    ws.restore()
    return [f"{ws.seed.name} mutant {index} ({label}): {p}" for p in found]


# CI: this many mutants per seed, every command on each; the reschedule runs (which import
# torch and replay) on every other one.
CI_MUTANTS = 80


def _count() -> int:
    return int(os.environ.get("CKPTTOOL_FUZZ", CI_MUTANTS))


def warm_up() -> None:
    """Import what the commands import the first time (torch, transformers), so that the time
    bound measures the work on each mutant."""
    from ckpttool.cli import cli

    runner = CliRunner()
    for seed in SEEDS:
        runner.invoke(cli, ["reschedule", str(FIXTURES / seed.path), "--dry-run",
                            *seed.reschedule])
        runner.invoke(cli, ["diff", str(FIXTURES / seed.path), str(FIXTURES / seed.path)])


@pytest.fixture(scope="module")
def warm():
    warm_up()


@pytest.mark.parametrize("seed", SEEDS, ids=[s.name for s in SEEDS])
def test_mutants_end_cleanly(seed, tmp_path, warm):
    ws = Workspace(seed, tmp_path)
    runner = CliRunner()
    found = []
    for index in range(_count()):
        found += check_mutant(ws, runner, index, reschedule=index % 2 == 0)
        if len(found) > 20:
            break
    assert not found, "\n".join(found)


# --- what the fuzzing found, each kept as a test of its own ------------------------------------


def _one_line(result) -> str:
    problems_ = problems(Outcome((), result.exit_code, result.stderr, 0.0))
    assert result.exit_code == 2 and not problems_, (result.stdout, result.stderr, problems_)
    return result.stderr.strip()


def _torch_zip(tmp_path: Path, tree: bytes, name: str = "c.pt",
               records: tuple[tuple[str, bytes], ...] = ()) -> Path:
    path = tmp_path / name
    path.write_bytes(repack([("archive/data.pkl", tree), *records,
                             ("archive/byteorder", b"little"), ("archive/version", b"3\n")]))
    return path


def _rewritten_pickle(source: Path, edit) -> list[tuple[str, bytes]]:
    records = _records(source.read_bytes())
    i = _pickled_member(records)
    records[i] = (records[i][0], edit(records[i][1]))
    return records


def test_found_bytes_keys_and_cycles_diff_cleanly(tmp_path):
    """deepdiff cannot name a path through a bytes key (TypeError), and a list holding itself
    sent the tree copy into endless recursion."""
    from ckpttool.cli import cli

    a = _torch_zip(tmp_path, pickle.dumps({b"key": 1, "loop": (loop := [1])}, 2), "a.pt")
    loop.append(loop)
    a.write_bytes(repack([("archive/data.pkl", pickle.dumps({b"key": 1, "loop": loop}, 2)),
                          ("archive/version", b"3\n")]))
    b = _torch_zip(tmp_path, pickle.dumps({b"key": 2, "loop": loop}, 2), "b.pt")
    result = CliRunner().invoke(cli, ["diff", str(a), str(b)])
    assert result.exit_code == 1 and result.stderr == "", result.stderr
    assert "b'key'" in result.stdout


def test_found_an_uncalled_allowlisted_global_is_a_value(tmp_path, caplog):
    """A rebuilder named but never called (its REDUCE deleted) stays a global, here a dict key:
    shown by name, compared without deepdiff logging to stderr (it cannot parse the key's repr
    back)."""
    from ckpttool.cli import cli

    tree = (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT
            + pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n" + pickle.SHORT_BINUNICODE
            + b"\x01x" + pickle.SETITEM + pickle.STOP)
    path = _torch_zip(tmp_path, tree)
    runner = CliRunner()
    doc = json.loads(runner.invoke(cli, ["show", "--json", str(path)]).stdout)
    assert doc["schema"] == "ckpttool.show/1"
    result = runner.invoke(cli, ["diff", str(FIXTURES / "adamw_cosine.pt"), str(path)])
    assert result.exit_code == 1 and result.stderr == "", result.stderr
    # (pytest takes log records itself; a real process would print them to stderr)
    assert not [r for r in caplog.records if r.name.startswith("deepdiff")]


@pytest.mark.parametrize("device", [b"xyz", b"mps"], ids=["unknown", "not-here"])
def test_found_a_device_torch_does_not_know(tmp_path, device):
    """A tensor lr whose storage names a device torch cannot use here (a name it does not
    know, or mps on Linux): re-stepped on cpu with a note, written back on that device, instead
    of torch's RuntimeError; --device on it is refused in one line."""
    from ckpttool.cli import cli
    from ckpttool.serialization import read_checkpoint

    records = _rewritten_pickle(FIXTURES / "tensor_lr.pt",
                                lambda p: p.replace(b"X\x03\0\0\0cpu", b"X\x03\0\0\0" + device))
    path, out = tmp_path / "c.pt", tmp_path / "out.pt"
    path.write_bytes(repack(records))
    result = CliRunner().invoke(cli, ["reschedule", str(path), "-o", str(out), "--set", "T_max=40"])
    assert result.exit_code == 0, result.stderr
    assert f"saved on {device.decode()}, and torch cannot use that device here: re-stepped on " \
           "cpu" in result.stdout and "verified" in result.stdout
    lr = read_checkpoint(out).root["optimizer"]["param_groups"][0]["lr"]
    assert lr.device == device.decode()
    line = _one_line(CliRunner().invoke(cli, ["reschedule", str(path), "--dry-run", "--set",
                                              "T_max=40", "--device", device.decode()]))
    assert device.decode() in line and "--device cpu" in line


def test_found_a_state_torch_cannot_load_is_refused_at_verification(tmp_path):
    """Groups whose params torch's load_state_dict refuses (a set): the rewrite is verified by
    loading it, so the output is refused and removed."""
    import torch

    from ckpttool.cli import cli

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    state = opt.state_dict()
    state["param_groups"][0]["params"] = [{0}]
    path = tmp_path / "c.pt"
    torch.save({"optimizer": state, "scheduler": sched.state_dict()}, path)
    out = tmp_path / "out.pt"
    line = _one_line(CliRunner().invoke(cli, ["reschedule", str(path), "-o", str(out),
                                              "--set", "step_size=3"]))
    assert "torch cannot load" in line and "nothing was written" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


@pytest.mark.parametrize("record", [0, -1], ids=["data.pkl", "last-record"])
@pytest.mark.parametrize("offset, value, message", [
    (8, 0x0020, "patch data"),  # general purpose flag bit 5: compressed patch data
    (8, 0x0040, "encrypted"),  # bit 6: strong encryption
    (6, 0x008B, "damaged zip"),  # version needed to extract: 13.9, which zipfile refuses
    (4, 0x0A8B, None),  # version made by: nobody reads it
], ids=["patch-flag", "strong-encryption", "version-needed", "version-made-by"])
def test_found_zip_fields_zipfile_refuses(tmp_path, record, offset, value, message):
    """Zip fields Python's zipfile refuses with NotImplementedError (not BadZipFile), on the
    record of the pickle or any other: refused with one line, or harmless."""
    from ckpttool.cli import cli

    data = bytearray((FIXTURES / "adamw_cosine.pt").read_bytes())
    entries = [i for i in range(len(data)) if data.startswith(b"PK\x01\x02", i)]
    at = entries[record] + offset
    data[at:at + 2] = struct.pack("<H", value)
    path = tmp_path / "c.pt"
    path.write_bytes(bytes(data))
    out = tmp_path / "o.pt"
    runner = CliRunner()
    for args in (["show", str(path)],
                 ["reschedule", str(path), "-o", str(out), "--set", "T_max=80"]):
        result = runner.invoke(cli, args)
        if message is None:
            assert result.exit_code == 0, result.stderr
        else:
            assert message in _one_line(result)
            assert not out.exists()


def test_found_a_legacy_storage_longer_than_the_file(tmp_path):
    """A legacy storage's element count past the end of the file (a seek torch would refuse
    with ValueError): the storage is missing, one line when it is needed."""
    from ckpttool.cli import cli

    data = (FIXTURES / "legacy.pt").read_bytes()
    end = legacy_pickles(data)[-1][1]
    path = tmp_path / "c.pt"
    path.write_bytes(data[:end] + struct.pack("<q", 1 << 62) + data[end + 8:])
    assert "missing" in _one_line(CliRunner().invoke(cli, ["show", str(path)]))


def test_found_a_storage_without_its_record(tmp_path):
    """The pickle names data/0 but the record was renamed: the staged copy refused it with a
    KeyError."""
    from ckpttool.cli import cli

    records = [(n.replace("/data/0", "/DATA/0"), p) for n, p in
               _records((FIXTURES / "adamw_cosine.pt").read_bytes())]
    path = tmp_path / "c.pt"
    path.write_bytes(repack(records))
    out = tmp_path / "o.pt"
    result = CliRunner().invoke(cli, ["reschedule", str(path), "-o", str(out), "--set",
                                      "T_max=80"])
    assert "storage '0'" in _one_line(result)
    assert not out.exists()


def test_found_a_sparse_list_in_dcp_planner_data(tmp_path):
    """One entry at list index 100,000 made a list of 100,001 items, which diff then compared
    one by one (seconds; 1,000,000 would be a minute): refused as damage."""
    import torch.distributed.checkpoint.filesystem  # noqa: F401  (what .metadata names)

    from ckpttool.cli import cli

    folder = tmp_path / "dcp"
    shutil.copytree(FIXTURES / "dirs" / "dcp" / "single", folder)
    with open(folder / ".metadata", "rb") as f:
        meta = pickle.load(f)  # the committed fixture: trusted
    key = "optim.param_groups.1.lr"
    meta.planner_data[key] = ("optim", "param_groups", 100_000, "lr")
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    start = time.perf_counter()
    line = _one_line(CliRunner().invoke(cli, ["diff", str(FIXTURES / "dirs/dcp/single"),
                                              str(folder)]))
    assert "100,000" in line and time.perf_counter() - start < 1
