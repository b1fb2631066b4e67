"""The writer: a rewrite is the input, re-emitted as torch.save would write it, plus the edits.

The oracles are torch itself (torch.load of the output, torch.save of the same values) and the
input file (storage records byte for byte, the tree structure, the whole file but its id).
"""

from __future__ import annotations

import argparse
import builtins
import io
import itertools
import math
import os
import pickle
import stat
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpttool import serialization
from ckpttool.errors import CkptToolError, InputError
from ckpttool.serialization import (
    NewTensor,
    Opaque,
    TensorRef,
    Marker,
    atomic_output,
    new_tensor_from_torch,
    read_checkpoint,
    write_checkpoint,
)
from conftest import record_durability

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
READABLE = sorted(p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*")
                  if p.suffix in (".pt", ".ckpt") and p.parent.name != "bad")
# Files torch.load(weights_only=True) refuses (opaque.pt holds a Namespace, a numpy scalar and a
# class from the generator's __main__); their pickle is compared byte for byte instead.
NOT_WEIGHTS_ONLY = {"opaque.pt"}


# --- helpers -------------------------------------------------------------------------------


def same_tree(a, b, path="root"):
    """Structural equality that also compares types, opaque contents and tensor recipes."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            same_tree(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{path}/{i}")
    elif isinstance(a, Opaque):
        assert (a.dotted, a.how) == (b.dotted, b.how), path
        for part in ("args", "kwargs", "state", "items", "dictitems"):
            same_tree(getattr(a, part), getattr(b, part), f"{path}.{part}")
    elif isinstance(a, TensorRef):
        assert a == b and a.rebuild[0] == b.rebuild[0], f"{path}: {a!r} != {b!r}"
        assert (a.requires_grad, a.parameter, a.subclass) == (b.requires_grad, b.parameter,
                                                              b.subclass), path
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def same_loaded(a, b, path="root"):
    """Equality of two torch.load results: tensors equal bit for bit, same dtype and strides."""
    if isinstance(a, torch.Tensor):
        assert type(a) is type(b) and a.dtype == b.dtype, path
        assert a.shape == b.shape and a.stride() == b.stride(), path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
        return
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            same_loaded(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same_loaded(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def record(ckpt, key: str) -> bytes:
    """The raw bytes of one storage record, straight from the file."""
    offset, size = ckpt.storage_spans[key]
    with open(ckpt.path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def assert_same_but_id(a, b):
    """Two zips are byte for byte the same but for their serialization id (40 digits, new for
    every save) and its CRC; compared in chunks, so that files past 4 GiB fit."""
    ends = []
    for path in (a, b):
        info = next(i for i in zipfile.ZipFile(path).infolist()
                    if i.filename.endswith(".data/serialization_id"))
        with open(path, "rb") as f:
            f.seek(info.header_offset + 26)
            ends.append(info.header_offset + 30 + sum(struct.unpack("<HH", f.read(4))))
    assert ends[0] == ends[1] and Path(a).stat().st_size == Path(b).stat().st_size
    tails = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start in range(0, ends[0], 64 << 20):
            n = min(64 << 20, ends[0] - start)
            assert fa.read(n) == fb.read(n), f"the files differ after byte {start}"
        for tail in (bytearray(fa.read()), bytearray(fb.read())):
            tail[:40] = bytes(40)  # the id
            tail[44:48] = bytes(4)  # its CRC in the data descriptor
            central = tail.rindex(b"PK\x01\x02")  # its central entry, the last one
            tail[central + 16:central + 20] = bytes(4)
            tails.append(tail)
    assert tails[0] == tails[1]


def folders(tmp_path, *names):
    """Paths under tmp_path, their folders made: a file named f.pt has zip folder f/."""
    paths = [tmp_path / name for name in names]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
    return paths


def rewrite(src, out, edit=None, **kwargs):
    """(the input as read, what write_checkpoint returned, the output as read)."""
    edited = read_checkpoint(src)
    if edit is not None:
        edit(edited.root)
    result = write_checkpoint(edited, edited.root, out, **kwargs)
    return read_checkpoint(src), result, read_checkpoint(out)


def to_tree(value, location=None):
    """A torch state value in the reader's vocabulary: tensors become NewTensor values."""
    if isinstance(value, torch.Tensor):
        return new_tensor_from_torch(value, location)
    if isinstance(value, dict):
        return type(value)((k, to_tree(v, location)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(to_tree(v, location) for v in value)
    return value


# --- unchanged trees: the same file --------------------------------------------------------


@pytest.mark.parametrize("name", READABLE)
def test_rewriting_an_unchanged_tree_gives_the_same_file(tmp_path, name):
    src, out = FIXTURES / name, tmp_path / "out.pt"
    ckpt, result, back = rewrite(src, out)
    assert back.kind == ckpt.kind
    same_tree(ckpt.root, back.root)
    assert result.copied == {k: k for k in ckpt.storage_spans}
    assert result.created == () and result.dropped == ()
    for key in ckpt.storage_spans:
        assert record(back, key) == record(ckpt, key), key
    # the input's zip folder name whatever the output's name: every payload keeps its offset
    assert back.zip_prefix == ckpt.zip_prefix and back.storage_spans == ckpt.storage_spans
    if ckpt.kind == "torch-zip":
        # torch.save's own bytes: pickle, record order, alignment, headers; only the id differs
        assert_same_but_id(out, src)
        assert zipfile.ZipFile(out).testzip() is None  # every CRC checks
    else:
        assert out.read_bytes() == src.read_bytes()
    assert result.size == out.stat().st_size


@pytest.mark.parametrize("name", [n for n in READABLE if n not in NOT_WEIGHTS_ONLY])
def test_torch_loads_the_rewrite_as_it_loads_the_input(tmp_path, monkeypatch, name):
    src, out = FIXTURES / name, tmp_path / "out.pt"
    ckpt, _, _ = rewrite(src, out)
    same_loaded(torch.load(src, weights_only=True), torch.load(out, weights_only=True))
    if ckpt.kind == "torch-zip":
        same_loaded(torch.load(src, weights_only=True),
                    torch.load(out, weights_only=True, mmap=True))
        # torch.load then checks the record offsets it computes from its own layout rules
        monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
        torch.load(out, weights_only=True)
        torch.load(out, weights_only=True, map_location="meta")


def test_opaque_values_are_written_back_exactly(tmp_path):
    src, out = FIXTURES / "opaque.pt", tmp_path / "out.pt"
    ckpt, _, back = rewrite(src, out)
    for key in ("args", "best_metric", "run_info"):
        assert isinstance(back.root[key], Opaque)
        same_tree(ckpt.root[key], back.root[key])
    assert (torch.serialization.get_unsafe_globals_in_checkpoint(out)
            == torch.serialization.get_unsafe_globals_in_checkpoint(src))
    prefix = ckpt.zip_prefix + "data.pkl"
    assert zipfile.ZipFile(out).read(prefix) == zipfile.ZipFile(src).read(prefix)


def test_a_hostile_pickle_is_copied_without_running_it(tmp_path, monkeypatch):
    # Never torch.load this file: it calls os.system.
    canary = tmp_path / "canary"
    monkeypatch.setenv("CKPTTOOL_CANARY", str(canary))
    src, out = FIXTURES / "bad" / "malicious.pt", tmp_path / "malicious.pt"
    ckpt, _, back = rewrite(src, out)  # a hand-written pickle: the same tree, not the same bytes
    same_tree(ckpt.root, back.root)
    assert back.globals_seen == ckpt.globals_seen == ["posix.system"]
    assert not canary.exists()


# --- edits ----------------------------------------------------------------------------------


def test_edited_values_and_a_new_tensor_lr(tmp_path):
    src, out = FIXTURES / "tensor_lr.pt", tmp_path / "out.pt"
    new_lr = torch.tensor(0.0123, dtype=torch.float32)

    def edit(root):
        group = root["optimizer"]["param_groups"][0]
        group["lr"] = new_tensor_from_torch(new_lr)
        group["weight_decay"] = 0.5

    ckpt, result, back = rewrite(src, out, edit)
    old_key = ckpt.root["optimizer"]["param_groups"][0]["lr"].storage.key
    assert result.dropped == (old_key,)
    assert len(result.created) == 1 and result.created[0] not in ckpt.storage_spans
    for key, new_key in result.copied.items():
        assert record(back, new_key) == record(ckpt, key)

    expected = torch.load(src, weights_only=True)
    expected["optimizer"]["param_groups"][0]["lr"] = new_lr
    expected["optimizer"]["param_groups"][0]["weight_decay"] = 0.5
    same_loaded(expected, torch.load(out, weights_only=True))
    same_tree(ckpt.root["model"], back.root["model"])
    same_tree(ckpt.root["scheduler"], back.root["scheduler"])


def test_a_tensor_no_longer_referenced_is_dropped(tmp_path):
    src, out = FIXTURES / "tensor_lr.pt", tmp_path / "out.pt"

    def edit(root):
        root["scheduler"]["base_lrs"] = [0.01]

    ckpt, result, back = rewrite(src, out, edit)
    dropped = ckpt.root["scheduler"]["base_lrs"][0].storage.key
    assert result.dropped == (dropped,)
    assert dropped not in back.storage_spans
    assert f"{back.zip_prefix}data/{dropped}" not in zipfile.ZipFile(out).namelist()
    assert torch.load(out, weights_only=True)["scheduler"]["base_lrs"] == [0.01]


@pytest.mark.parametrize("name", ["tensor_lr.pt", "legacy.pt", "adamw_cosine.pt"])
def test_a_new_scheduler_state_from_torch_resumes_in_torch(tmp_path, name):
    src, out = FIXTURES / name, tmp_path / "out.pt"
    lr = torch.tensor(0.01) if name == "tensor_lr.pt" else 0.01

    def make():
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(4)]
        return torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=lr)

    opt = make()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=40)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    ckpt, _, back = rewrite(src, out, lambda root: root.__setitem__("scheduler", to_tree(state)))
    assert back.kind == ckpt.kind
    same_tree(ckpt.root["model"], back.root["model"])
    written = torch.load(out, weights_only=True)["scheduler"]
    same_loaded(state, written)

    # the documented resume: a fresh optimizer and scheduler, then load_state_dict
    opt2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2 = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=0.05, total_steps=40)
    sched2.load_state_dict(written)
    for _ in range(5):
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
        assert sched2.get_last_lr() == sched.get_last_lr()


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
          torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_new_tensors_are_written_exactly_as_torch_save_writes_them(tmp_path, dtype):
    base, ours, theirs = folders(tmp_path, "base/f.pt", "ours.pt", "theirs/f.pt")
    value = (torch.arange(6).reshape(2, 3) % 3).to(dtype)
    torch.save({"lr": torch.tensor(0.5)}, base)
    rewrite(base, ours, lambda root: root.__setitem__("lr", new_tensor_from_torch(value)))
    torch.save({"lr": value}, theirs)
    assert_same_but_id(ours, theirs)
    same_loaded({"lr": value}, torch.load(ours, weights_only=True))


def test_new_storages_come_after_the_input_keys_unless_torch_needs_data_0_first(tmp_path):
    base, ours, theirs = folders(tmp_path, "base/f.pt", "ours.pt", "theirs/f.pt")
    w, new = torch.arange(4.0), torch.tensor(0.25)
    torch.save({"w": w, "lr": torch.tensor(0.5)}, base)
    _, result, _ = rewrite(base, ours, lambda r: r.__setitem__("lr", new_tensor_from_torch(new)))
    assert result.copied == {"0": "0"} and result.created == ("2",)  # never the dropped "1"

    # The new tensor is named first: torch.load(map_location="meta") wants data/0 first, so
    # the keys become torch.save's own.
    torch.save({"lr": torch.tensor(0.5), "w": w}, base)
    _, result, _ = rewrite(base, ours, lambda r: r.__setitem__("lr", new_tensor_from_torch(new)))
    assert result.copied == {"1": "1"} and result.created == ("0",)
    torch.save({"lr": new, "w": w}, theirs)
    assert_same_but_id(ours, theirs)
    torch.load(ours, weights_only=True, map_location="meta")


def test_a_new_tensor_keeps_its_device_tag(tmp_path):
    src, out = FIXTURES / "tensor_lr.pt", tmp_path / "out.pt"
    lr = new_tensor_from_torch(torch.tensor(0.02), location="cuda:1")
    _, _, back = rewrite(src, out, lambda r: r["scheduler"].__setitem__("_last_lr", [lr]))
    assert back.root["scheduler"]["_last_lr"][0].device == "cuda:1"
    loaded = torch.load(out, weights_only=True, map_location="cpu")
    assert loaded["scheduler"]["_last_lr"][0].item() == torch.tensor(0.02).item()


def test_legacy_stays_legacy_with_edits(tmp_path):
    src, out = FIXTURES / "legacy.pt", tmp_path / "out.pt"
    new_lr = torch.tensor([0.5, 0.25], dtype=torch.float64)

    def edit(root):
        root["optimizer"]["param_groups"][0]["lr"] = 0.003
        root["extra"] = new_tensor_from_torch(new_lr)

    ckpt, result, back = rewrite(src, out, edit)
    assert back.kind == "torch-legacy" and not zipfile.is_zipfile(out)
    for key, new_key in result.copied.items():
        assert record(back, new_key) == record(ckpt, key)
    expected = torch.load(src, weights_only=True)
    expected["optimizer"]["param_groups"][0]["lr"] = 0.003
    expected["extra"] = new_lr
    same_loaded(expected, torch.load(out, weights_only=True))


def test_legacy_records_are_found_whatever_the_edited_tree_names(tmp_path):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    tensors = {name: torch.arange(n, dtype=dtype) for name, n, dtype in
               [("a", 3, torch.float64), ("b", 5, torch.int16), ("c", 7, torch.float32),
                ("d", 2, torch.int64)]}
    torch.save(tensors, src, _use_new_zipfile_serialization=False)
    ckpt = read_checkpoint(src)
    for name in ("a", "c"):
        del ckpt.root[name]  # edited in place: the tree no longer names these storages
    ckpt.root["e"] = new_tensor_from_torch(torch.ones(2, dtype=torch.bfloat16))
    write_checkpoint(ckpt, ckpt.root, out)
    same_loaded({"b": tensors["b"], "d": tensors["d"], "e": torch.ones(2, dtype=torch.bfloat16)},
                torch.load(out, weights_only=True))
    with pytest.raises(CkptToolError, match="legacy"):
        ckpt.root["f"] = NewTensor("uint16", (), b"\x00\x01")
        write_checkpoint(ckpt, ckpt.root, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_shared_objects_stay_shared(tmp_path):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    shared, weight = [1, 2, 3], torch.arange(6.0)
    torch.save({"a": shared, "b": shared, "w": weight, "view": weight[2:4]}, src)
    _, _, back = rewrite(src, out)
    assert back.root["a"] is back.root["b"]
    assert back.root["w"].storage.key == back.root["view"].storage.key
    loaded = torch.load(out, weights_only=True)
    assert loaded["a"] is loaded["b"]
    assert loaded["view"].untyped_storage().data_ptr() == loaded["w"].untyped_storage().data_ptr()


def test_every_kind_of_tensor_is_written_back_as_torch_wrote_it(tmp_path):
    weight = torch.arange(12.0).reshape(3, 4)
    tagged = torch.ones(2)
    tagged.note = "python attributes make torch pickle it through _rebuild_from_type_v2"
    tensors = {"param": torch.nn.Parameter(torch.ones(2, 2)),
               "frozen": torch.nn.Parameter(torch.ones(1), requires_grad=False),
               "grad": torch.ones(3, requires_grad=True), "tagged": tagged,
               "view": weight[1:, ::2], "weight": weight, "empty": torch.empty(0, 5),
               "meta": torch.empty(4, device="meta"),
               "u16": torch.tensor([1, 2], dtype=torch.uint16)}
    src, out = tmp_path / "t.pt", tmp_path / "out.pt"
    torch.save(tensors, src)
    ckpt, _, back = rewrite(src, out)
    same_tree(ckpt.root, back.root)
    assert_same_but_id(out, src)
    loaded = torch.load(out, weights_only=False)
    assert loaded["tagged"].note == tagged.note and loaded["grad"].requires_grad
    assert isinstance(loaded["param"], torch.nn.Parameter) and loaded["meta"].is_meta
    assert torch.equal(loaded["view"], weight[1:, ::2])


def test_a_sparse_tensor_loads_back(tmp_path):
    # The reader reads torch.Size as a tuple, so its size comes back as one: equal, not the
    # same bytes.
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save({"sparse": torch.eye(3).to_sparse()}, src)
    rewrite(src, out)
    assert torch.equal(torch.load(out, weights_only=True)["sparse"].to_dense(), torch.eye(3))


class Keyword:
    """A class pickled with keyword arguments to __new__ (protocol 4's NEWOBJ_EX)."""

    def __new__(cls, *, size):
        self = super().__new__(cls)
        self.size = size
        return self

    def __getnewargs_ex__(self):
        return (), {"size": self.size}

    class Inner:
        """A nested class: only protocol 4 names it directly."""


class Plain:
    """A plain class: protocol 1 rebuilds it through copyreg._reconstructor."""

    def __init__(self):
        self.depth = 3


@pytest.mark.parametrize("protocol", [1, 2, 4])
def test_opaque_values_from_any_pickle_protocol(tmp_path, protocol):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    obj = {"args": argparse.Namespace(lr=0.1), "plain": Plain(), "w": torch.ones(2),
           "od": OrderedDict(a=1), "set": {1, 2}, "bytes": b"\x00\xff"}
    if protocol == 4:
        obj.update(keyword=Keyword(size=3), nested=Keyword.Inner)
    torch.save(obj, src, pickle_protocol=protocol)
    ckpt, _, back = rewrite(src, out)
    same_tree(ckpt.root, back.root)
    loaded = torch.load(out, weights_only=False)  # our own classes, in this process
    assert loaded["plain"].depth == 3 and loaded["args"].lr == 0.1
    assert loaded["set"] == {1, 2} and loaded["bytes"] == b"\x00\xff"
    if protocol == 4:
        assert loaded["keyword"].size == 3 and loaded["nested"] is Keyword.Inner


def test_builtin_values_read_as_values_and_are_written_back_exactly(tmp_path):
    # torch.save (pickle protocol 2) names these __builtin__.frozenset, __builtin__.complex ...
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    values = {"fs": frozenset({3}), "c": 1 + 2j, "ba": bytearray(b"x\xff"), "s": {1},
              "sl": slice(1, 2)}
    torch.save(values, src)
    ckpt, _, back = rewrite(src, out)
    assert ckpt.root == back.root == values
    assert zipfile.ZipFile(out).read("in/data.pkl") == zipfile.ZipFile(src).read("in/data.pkl")


def test_compressed_records_are_refused_and_nothing_is_written(tmp_path):
    src, repacked, out = tmp_path / "in.pt", tmp_path / "repacked.pt", tmp_path / "out.pt"
    torch.save({"w": torch.zeros(1000), "lr": 0.1}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(repacked, "w") as zout:
        for info in zin.infolist():  # what `zip -r` would do to a checkpoint
            zout.writestr(info.filename, zin.read(info), zipfile.ZIP_DEFLATED)
    with pytest.raises(InputError, match="compressed.*re-save"):
        rewrite(repacked, out)
    assert not out.exists()


def test_records_torch_save_does_not_write_are_refused(tmp_path):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save({"w": torch.zeros(3)}, src)
    with zipfile.ZipFile(src, "a") as z:
        z.writestr("in/extra.json", "{}")
    with pytest.raises(CkptToolError, match="extra.json"):
        rewrite(src, out)
    assert not out.exists()


def test_what_cannot_be_written_is_refused(tmp_path):
    ckpt = read_checkpoint(FIXTURES / "tensor_lr.pt")
    with pytest.raises(TypeError, match="new_tensor_from_torch"):
        write_checkpoint(ckpt, {"lr": torch.tensor(0.1)}, tmp_path / "out.pt")
    with pytest.raises(ValueError, match="bytes"):
        NewTensor("float32", (2,), b"\x00" * 4)
    with pytest.raises(ValueError, match="qint8"):
        NewTensor("qint8", (), b"\x00")
    torch.save({"x": torch.tensor(1.0)}, tmp_path / "small.pt")  # data/0 holds 4 bytes
    small = read_checkpoint(tmp_path / "small.pt")
    other = read_checkpoint(FIXTURES / "adamw_cosine.pt").root["model"]["0.weight"]  # 48
    with pytest.raises(InputError, match="shorter than its tensors"):
        write_checkpoint(small, {"w": other}, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_only_torch_save_files_are_written(tmp_path):
    out = tmp_path / "out.pt"
    bare = read_checkpoint(FIXTURES / "bad" / "malicious_legacy.pt")  # never torch.load it
    with pytest.raises(CkptToolError, match="only torch.save files"):
        write_checkpoint(bare, bare.root, out)
    assert not out.exists()


def test_copied_payloads_keep_their_page_phase(tmp_path, monkeypatch):
    # A pickle of another length moves every record; copy_file_range is much faster page onto
    # page, so the first storage record's header is padded to keep each payload's page phase.
    # (Only for big copies: the threshold is lowered here to test it on a small file.)
    monkeypatch.setattr(serialization, "_PHASE_MIN_BYTES", 0)
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save({"model": {f"w{i}": torch.randn(3 + i, 5) for i in range(6)},
                "optimizer": {"param_groups": [{"lr": 0.1, "weight_decay": 0}]}}, src)

    def edit(root):
        root["optimizer"]["param_groups"][0]["weight_decay"] = 0.01  # int -> float: 8 bytes more
        root["note"] = "a" * 301

    ckpt, result, back = rewrite(src, out, edit)
    assert out.stat().st_size != src.stat().st_size
    for key, new_key in result.copied.items():
        assert back.storage_spans[new_key][0] % 4096 == ckpt.storage_spans[key][0] % 4096, key
        assert back.storage_spans[new_key][0] % 64 == 0
        assert record(back, new_key) == record(ckpt, key)
    expected = torch.load(src, weights_only=True)
    expected["optimizer"]["param_groups"][0]["weight_decay"] = 0.01
    expected["note"] = "a" * 301
    same_loaded(expected, torch.load(out, weights_only=True))
    # torch.load computes the records after the first from miniz's layout rules, and checks
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    from torch.utils.serialization import config

    # (set and restored by hand: pytest >= 9.2's monkeypatch deletes the entry of torch's
    # config proxy on undo, breaking every later torch.load)
    saved = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        same_loaded(expected, torch.load(out, weights_only=True, mmap=True))
        torch.load(out, weights_only=True, map_location="meta")
    finally:
        config.load.calculate_storage_offsets = saved


# --- zip64 ----------------------------------------------------------------------------------


def test_zip64_fields_read_back_everywhere(tmp_path, monkeypatch):
    # Every record gets its zip64 fields, as past 4 GiB, on a file small enough for every run.
    monkeypatch.setattr(serialization, "_ZIP64_LIMIT", 0)
    src, out = FIXTURES / "adamw_cosine.pt", tmp_path / "out.pt"
    ckpt, _, back = rewrite(src, out)
    infos = zipfile.ZipFile(out).infolist()
    assert all(i.extra[:2] == b"\x01\x00" for i in infos)
    assert zipfile.ZipFile(out).testzip() is None
    same_tree(ckpt.root, back.root)
    for key in ckpt.storage_spans:
        assert record(back, key) == record(ckpt, key)
        assert back.storage_spans[key][0] % 64 == 0
    same_loaded(torch.load(src, weights_only=True), torch.load(out, weights_only=True))
    same_loaded(torch.load(src, weights_only=True),
                torch.load(out, weights_only=True, mmap=True))


@pytest.mark.parametrize("size, offset", [(10, 5 << 30), (5 << 30, 1000), (5 << 30, 6 << 30),
                                          (0, 5 << 30), (0xFFFFFFFF, 0xFFFFFFFF)])
def test_zip64_headers_past_4_gib(size, offset):
    name = b"big/data/7"
    local, descriptor, central = serialization._zip_entry(name, size, 0x1234, offset)
    extra = local[30 + len(name):]
    big_size, big_offset = size >= 0xFFFFFFFF, offset >= 0xFFFFFFFF
    # miniz's zip64 field, then torch's "FB" padding up to a 64-byte aligned payload
    fields = ((size, 0) if big_size else ()) + ((offset,) if big_offset else ())
    zip64 = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields)
    assert extra.startswith(zip64) and extra[len(zip64):len(zip64) + 2] == b"FB"
    assert (offset + len(local)) % 64 == 0
    assert len(descriptor) == (0 if not size else 24 if big_size or big_offset else 16)
    # Python's zipfile reads sizes and offset back from the central entry
    info = zipfile.ZipInfo()
    fields = struct.unpack("<4sHHHHHHIIIHHHHHII", central[:46])
    info.file_size, info.compress_size, info.header_offset = fields[9], fields[8], fields[16]
    info.extra = central[46 + len(name):]
    info._decodeExtra(0x1234) if sys.version_info >= (3, 12) else info._decodeExtra()
    assert (info.file_size, info.compress_size, info.header_offset) == (size, size, offset)


@pytest.mark.skipif(not os.environ.get("CKPTTOOL_SLOW_TESTS"),
                    reason="writes ~13 GB; set CKPTTOOL_SLOW_TESTS=1 to run")
def test_a_checkpoint_past_4_gib_matches_torch_save(tmp_path):
    base, ours, theirs = folders(tmp_path, "base/f.pt", "ours.pt", "theirs/f.pt")
    big = torch.zeros((1 << 32) + 64, dtype=torch.uint8)  # a record over 4 GiB
    w, new = torch.arange(10.0), torch.tensor(0.25)  # a record past 4 GiB
    torch.save({"lr": torch.tensor(0.5), "big": big, "w": w}, base)
    _, _, back = rewrite(base, ours, lambda r: r.__setitem__("lr", new_tensor_from_torch(new)))
    torch.save({"lr": new, "big": big, "w": w}, theirs)
    del big
    assert_same_but_id(ours, theirs)
    assert back.storage_spans["2"][0] > 1 << 32
    loaded = torch.load(ours, weights_only=True, mmap=True)
    assert torch.equal(loaded["w"], w) and loaded["lr"].item() == 0.25


# --- atomicity ------------------------------------------------------------------------------


def _fail_after(n_calls, error):
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) >= n_calls:
            raise error

    return progress


@pytest.fixture
def every_chunk(monkeypatch):
    """Progress reported after every piece and chunk (not once per 32 MB): the callback is the
    way to fail a write at a chosen point."""
    monkeypatch.setattr(serialization, "PROGRESS_BYTES", 1)


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_failed_write_leaves_nothing_behind(tmp_path, error, every_chunk):
    src = FIXTURES / "adamw_cosine.pt"
    out = tmp_path / "out.pt"
    with pytest.raises(type(error)):
        rewrite(src, out, progress=_fail_after(3, error))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_an_existing_output_untouched(tmp_path, every_chunk):
    out = tmp_path / "out.pt"
    out.write_bytes(b"the previous checkpoint")
    with pytest.raises(RuntimeError):
        rewrite(FIXTURES / "adamw_cosine.pt", out, progress=_fail_after(5, RuntimeError()))
    assert out.read_bytes() == b"the previous checkpoint"
    assert list(tmp_path.iterdir()) == [out]


def test_progress_counts_every_byte(tmp_path, every_chunk):
    seen = []
    _, result, _ = rewrite(FIXTURES / "adamw_cosine.pt", tmp_path / "out.pt",
                           progress=lambda done, total: seen.append((done, total)))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (result.size, result.size) == ((tmp_path / "out.pt").stat().st_size,) * 2


def test_atomic_output_modes_and_cleanup(tmp_path):
    target = tmp_path / "new.bin"
    with atomic_output(target) as f:
        f.write(b"abc")
        assert not target.exists()
        (temporary,) = tmp_path.iterdir()
        assert temporary.name.startswith(".new.bin.")
    assert target.read_bytes() == b"abc"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask

    target.chmod(0o600)
    with atomic_output(target) as f:
        f.write(b"replaced")
    assert target.read_bytes() == b"replaced"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(ValueError), atomic_output(target) as f:
        f.write(b"half")
        raise ValueError
    assert target.read_bytes() == b"replaced" and list(tmp_path.iterdir()) == [target]


def test_the_input_is_only_read(tmp_path, monkeypatch):
    src = tmp_path / "in.pt"
    src.write_bytes((FIXTURES / "adamw_cosine.pt").read_bytes())
    before = src.stat()
    opened = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, mode="r", *args, **kwargs):
        opened.append((str(file), mode))
        return real_open(file, mode, *args, **kwargs)

    def spy_os_open(path, flags, *args, **kwargs):
        opened.append((str(path), "w" if flags & (os.O_WRONLY | os.O_RDWR) else "r"))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    rewrite(src, tmp_path / "out.pt")
    assert {mode for path, mode in opened if path == str(src)} <= {"r", "rb"}
    assert src.stat().st_mtime_ns == before.st_mtime_ns
    assert src.read_bytes() == (FIXTURES / "adamw_cosine.pt").read_bytes()


def test_rewriting_in_place_replaces_the_file_whole(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes((FIXTURES / "tensor_lr.pt").read_bytes())
    ckpt = read_checkpoint(path)
    ckpt.root["step"] = 99
    write_checkpoint(ckpt, ckpt.root, path)
    assert torch.load(path, weights_only=True)["step"] == 99
    assert list(tmp_path.iterdir()) == [path]


def test_copies_fall_back_when_the_kernel_cannot(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(18, "Invalid cross-device link")  # EXDEV

    monkeypatch.setattr(serialization, "_write_directly", lambda fd: False)  # (as on tmpfs)
    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(os, "sendfile", refuse)
    src = FIXTURES / "adamw_cosine.pt"
    rewrite(src, tmp_path / "out.pt")
    assert_same_but_id(tmp_path / "out.pt", src)


# --- direct writes --------------------------------------------------------------------------


def needs_direct_io(folder):
    probe = folder / ".probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT)
    try:
        if not serialization._write_directly(fd):
            pytest.skip("this filesystem has no direct I/O")
    finally:
        os.close(fd)
        os.remove(probe)


def many_blocks(tmp_path, monkeypatch):
    """An input of a dozen 8 KB blocks, written in 8 KB blocks: (input, output folder)."""
    src, out = folders(tmp_path, "in/in.pt", "out/out.pt")
    needs_direct_io(out.parent)
    monkeypatch.setattr(serialization, "_DIRECT_BLOCK", 8192)
    torch.manual_seed(0)
    torch.save({"model": {f"w{i}": torch.randn(1000 + 37 * i) for i in range(24)},
                "optimizer": {"param_groups": [{"lr": 0.1, "weight_decay": 0}]}}, src)
    return src, out.parent


def edit(root):
    root["optimizer"]["param_groups"][0]["weight_decay"] = 0.01  # the pickle changes length
    root["note"] = "a" * 20000  # and spans blocks


def spy_writes(monkeypatch, fail=None):
    """Record (offset, length, O_DIRECT set) of each os.pwrite; ``fail(i, direct)`` may return
    an OSError to raise instead."""
    import fcntl

    writes, real = [], os.pwrite

    def pwrite(fd, data, offset):
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        error = fail(len(writes), direct) if fail else None
        writes.append((offset, len(data), direct))
        if error is not None:
            raise error
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return writes


def test_the_output_goes_to_disk_directly_in_whole_blocks(tmp_path, monkeypatch):
    src, out = many_blocks(tmp_path, monkeypatch)
    writes = spy_writes(monkeypatch)
    _, result, _ = rewrite(src, out / "direct.pt", edit)
    assert len(writes) > 3 and all(direct for *_, direct in writes)
    assert all(o % 4096 == 0 and n % 4096 == 0 for o, n, _ in writes)
    starts = itertools.accumulate([0] + [n for _, n, _ in writes[:-1]])
    assert [o for o, *_ in writes] == list(starts)  # in order, one after the other
    assert (out / "direct.pt").stat().st_size == result.size  # the padded last block cut off
    # The same bytes as written through the page cache.
    monkeypatch.setattr(serialization, "_write_directly", lambda fd: False)
    rewrite(src, out / "cached.pt", edit)
    assert (out / "direct.pt").read_bytes() == (out / "cached.pt").read_bytes()
    expected = torch.load(src, weights_only=True)
    edit(expected)
    same_loaded(expected, torch.load(out / "direct.pt", weights_only=True))


def test_a_device_wanting_coarser_blocks_gets_them_through_the_cache(tmp_path, monkeypatch):
    src, out = many_blocks(tmp_path, monkeypatch)
    rewrite(src, out / "expected.pt", edit)
    writes = spy_writes(monkeypatch, lambda i, direct: OSError(22, "Invalid argument")
                        if direct else None)
    rewrite(src, out / "out.pt", edit)
    assert writes[0][2] and not any(direct for *_, direct in writes[1:])
    assert writes[1][:2] == writes[0][:2]  # the refused block, again
    assert (out / "out.pt").read_bytes() == (out / "expected.pt").read_bytes()


def test_a_failed_direct_write_leaves_nothing_behind(tmp_path, monkeypatch):
    src, out = many_blocks(tmp_path, monkeypatch)
    spy_writes(monkeypatch, lambda i, direct: OSError(28, "No space left on device")
               if i == 2 else None)
    with pytest.raises(CkptToolError, match=r"\(No space left on device\); nothing was written"):
        rewrite(src, out / "out.pt", edit)
    assert list(out.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name == "ckpttool-writer"]


def test_the_output_is_fsynced_before_it_takes_its_name(tmp_path, monkeypatch):
    src, out = many_blocks(tmp_path, monkeypatch)
    events = record_durability(monkeypatch)
    rewrite(src, out / "out.pt", edit)
    assert events == ["fsync file", "rename to out.pt", "fsync folder"]
    events.clear()
    ckpt = read_checkpoint(src)
    serialization.StagedWrite(ckpt, out / "staged.pt", list(ckpt.storage_order)).finish(ckpt.root)
    assert events == ["fsync file", "rename to staged.pt", "fsync folder"]


def test_a_staged_write_copies_while_the_tree_is_made(tmp_path, monkeypatch):
    src, out = many_blocks(tmp_path, monkeypatch)
    ckpt = read_checkpoint(src)
    staged = serialization.StagedWrite(ckpt, out / "out.pt", list(ckpt.storage_order[:5]))
    edit(ckpt.root)
    written = staged.finish(ckpt.root)
    assert written.copied == {k: k for k in ckpt.storage_order}
    back = read_checkpoint(out / "out.pt")
    assert all(record(back, k) == record(ckpt, k) for k in ckpt.storage_order)
    expected = torch.load(src, weights_only=True)
    edit(expected)
    same_loaded(expected, torch.load(out / "out.pt", weights_only=True))


def test_aborting_a_staged_write_stops_its_copy_and_leaves_nothing(tmp_path, monkeypatch):
    src, out = many_blocks(tmp_path, monkeypatch)
    ckpt = read_checkpoint(src)
    started, go, reads, real = threading.Event(), threading.Event(), [], os.preadv

    def preadv(*args):  # the first read waits until abort() has asked the copy to stop
        reads.append(args)
        started.set()
        go.wait(10)
        return real(*args)

    monkeypatch.setattr(os, "preadv", preadv)
    staged = serialization.StagedWrite(ckpt, out / "out.pt", list(ckpt.storage_order))
    assert started.wait(10)
    aborting = threading.Thread(target=staged.abort)
    aborting.start()
    while not staged._cancelled.is_set():
        time.sleep(0.001)
    go.set()
    aborting.join(10)
    assert not aborting.is_alive() and len(reads) == 1  # 24 records, one read
    assert list(out.iterdir()) == []


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=5) | st.binary(max_size=5),
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner)
                   | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=4)
                   | st.builds(OrderedDict, st.dictionaries(st.text(max_size=3), inner,
                                                            max_size=3))
                   | st.frozensets(st.integers(), max_size=3)),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(tree=plain, size=st.sampled_from([0, 1, 2, 999, 1000, 1001, 2000, 2001]))
def test_the_pickler_writes_what_the_c_pickler_writes(tree, size):
    # torch.save pickles with CPython's C pickler; batches of 1000 are where it differs most
    for value in (tree, [tree] * size, {i: tree for i in range(size)}):
        buf = io.BytesIO()
        serialization._TreePickler(buf, serialization._Storages([], legacy=False), 2).dump(value)
        assert buf.getvalue() == pickle.dumps(value, protocol=2)


# --- naming and imports ---------------------------------------------------------------------


def test_writing_does_not_import_torch(tmp_path):
    code = (
        "import struct, sys\n"
        "from ckpttool.serialization import NewTensor, read_checkpoint, write_checkpoint\n"
        f"c = read_checkpoint({str(FIXTURES / 'tensor_lr.pt')!r})\n"
        "g = c.root['optimizer']['param_groups'][0]\n"
        "g['weight_decay'] = 0.25\n"
        "g['lr'] = NewTensor('float32', (), struct.pack('<f', 0.5))\n"
        f"write_checkpoint(c, c.root, {str(tmp_path / 'out.pt')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert loaded["optimizer"]["param_groups"][0]["lr"].item() == 0.5
    assert loaded["optimizer"]["param_groups"][0]["weight_decay"] == 0.25


def test_markers_are_written_as_torch_writes_them(tmp_path):
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save({"dtype": torch.bfloat16, "device": torch.device("cuda", 1),
                "cpu": torch.device("cpu"), "storage": torch.FloatStorage}, src)
    ckpt, _, back = rewrite(src, out)
    assert all(isinstance(back.root[k], Marker) for k in back.root)
    same_tree(ckpt.root, back.root)
    loaded, expected = torch.load(out, weights_only=False), torch.load(src, weights_only=False)
    assert loaded["storage"].dtype == expected.pop("storage").dtype == torch.float32
    assert {k: v for k, v in loaded.items() if k != "storage"} == expected
    assert zipfile.ZipFile(out).read("in/data.pkl") == zipfile.ZipFile(src).read("in/data.pkl")


def test_small_files_get_no_page_padding(tmp_path):
    src, out = FIXTURES / "adamw_cosine.pt", tmp_path / "out.pt"
    ckpt = read_checkpoint(src)
    root = dict(ckpt.root)
    root["note"] = "a" * 301  # the pickle changes length
    write_checkpoint(ckpt, root, out)
    assert out.stat().st_size < src.stat().st_size + 1024


def test_copy_file_copies_bytes_durably_and_never_overwrites(tmp_path, monkeypatch):
    from ckpttool import serialization

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom((33 << 20) + 4097))  # past one direct block, unaligned tail
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    seen = []
    assert serialization.copy_file(src, tmp_path / "dst.bin", report=seen.append) == src.stat().st_size
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()
    assert sum(seen) == src.stat().st_size and synced
    assert os.stat(tmp_path / "dst.bin").st_ino != src.stat().st_ino
    with pytest.raises(FileExistsError):
        serialization.copy_file(src, tmp_path / "dst.bin")
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()


# --- progress ---------------------------------------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch):
    """Copies in 8 KB chunks (direct blocks or kernel copies) and progress once per 32 KB: the
    32 MB of the real thing, scaled down."""
    monkeypatch.setattr(serialization, "_DIRECT_BLOCK", 8192)
    monkeypatch.setattr(serialization, "_COPY_CHUNK", 8192)
    monkeypatch.setattr(serialization, "PROGRESS_BYTES", 32768)
    return 32768


def _spaced(seen, every, total):
    """Reports in order, at least ``every`` bytes apart but the last, which is the total."""
    dones = [d for d, _ in seen]
    assert all(t == total for _, t in seen)
    assert dones[-1] == total and dones == sorted(dones)
    assert all(b - a >= every for a, b in zip([0] + dones[:-2], dones[:-1]))
    return dones


def test_one_progress_follows_many_copies(tmp_path, small_blocks):
    """The folder writer's case: several files (or shards) copied, one progress over all."""
    sizes = [50_000, 123_457, 8192]
    srcs = []
    for i, size in enumerate(sizes):
        srcs.append(tmp_path / f"in{i}.bin")
        srcs[-1].write_bytes(os.urandom(size))
    seen = []
    progress = serialization.CopyProgress(sum(sizes), lambda d, t: seen.append((d, t)))
    for i, src in enumerate(srcs):
        serialization.copy_file(src, tmp_path / f"out{i}.bin", report=progress.add)
        assert (tmp_path / f"out{i}.bin").read_bytes() == src.read_bytes()
    dones = _spaced(seen, small_blocks, sum(sizes))
    assert 2 < len(dones) <= sum(sizes) // small_blocks + 1


def test_write_progress_is_reported_once_per_block_at_most(tmp_path, small_blocks):
    src, out = folders(tmp_path, "in/in.pt", "out/out.pt")
    torch.save({f"w{i}": torch.randn(2000 + 37 * i) for i in range(24)}, src)
    seen = []
    _, result, _ = rewrite(src, out, progress=lambda d, t: seen.append((d, t)))
    dones = _spaced(seen, small_blocks, result.size)
    assert result.size == out.stat().st_size and 2 < len(dones) <= result.size // small_blocks + 1


def test_a_staged_write_reports_its_copy_from_the_callers_thread(tmp_path, monkeypatch,
                                                                  small_blocks):
    """finish() waits for the staged copy; meanwhile it reports how far the copy got, in the
    caller's thread (a bar is drawn there), then the rest, ending at the output's size."""
    src, out = folders(tmp_path, "in/in.pt", "out/out.pt")
    torch.save({"model": {f"w{i}": torch.randn(3000) for i in range(16)},
                "optimizer": {"param_groups": [{"lr": 0.1}]}}, src)
    monkeypatch.setattr(serialization, "_PROGRESS_POLL_S", 0.005)
    real_copy = serialization._Appender.copy

    def slow_copy(self, offset, size):  # the staged copy takes a while
        if threading.current_thread().name == "ckpttool-staged-copy":
            time.sleep(0.02)
        return real_copy(self, offset, size)

    monkeypatch.setattr(serialization._Appender, "copy", slow_copy)
    ckpt = read_checkpoint(src)
    staged = serialization.StagedWrite(ckpt, out, list(ckpt.storage_order))
    ckpt.root["optimizer"]["param_groups"][0]["lr"] = 0.05
    seen, threads = [], set()

    def progress(done, total):
        seen.append((done, total, staged._thread.is_alive()))
        threads.add(threading.current_thread().name)

    written = staged.finish(ckpt.root, progress=progress)
    assert threads == {threading.main_thread().name}
    assert any(alive for *_, alive in seen)  # reported while the copy was still running
    assert all(d < t for d, t, _ in seen[:-1]) and seen[-1][:2] == (written.size,) * 2
    assert [d for d, *_ in seen] == sorted(d for d, *_ in seen)
    assert written.size == out.stat().st_size
    expected = torch.load(src, weights_only=True)
    expected["optimizer"]["param_groups"][0]["lr"] = 0.05
    same_loaded(expected, torch.load(out, weights_only=True))
