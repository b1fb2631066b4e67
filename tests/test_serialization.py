"""The safe reader: what it reads back equals what torch saved, and it never runs code."""

from __future__ import annotations

import argparse
import io
import pickle
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from ckpttool.errors import InputError, UnsafeCheckpointError
from ckpttool.inspection import load
from ckpttool.serialization import (
    Opaque,
    TensorRef,
    load_tensor,
    read_checkpoint,
    safe_loads,
    walk,
)


class Config:
    """A user class torch's weights_only loader refuses."""

    def __init__(self):
        self.depth = 3


def _save(tmp_path, obj, name="c.pt", legacy=False):
    path = tmp_path / name
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


TENSORS = {
    "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "f64": torch.tensor([0.1, 0.2], dtype=torch.float64),
    "bf16": torch.tensor(1.5, dtype=torch.bfloat16),
    "f16": torch.tensor([2.5], dtype=torch.float16),
    "i64": torch.tensor(7),
    "u16": torch.tensor([3], dtype=torch.uint16),
    "f8": torch.zeros(4, dtype=torch.float8_e4m3fn),
    "bool": torch.tensor([True, False]),
    "view": torch.arange(12.0).reshape(3, 4)[1:, ::2],
    "param": torch.nn.Parameter(torch.ones(2, 2)),
}


@pytest.mark.parametrize("legacy", [False, True])
def test_tensor_metadata_matches_torch(tmp_path, legacy):
    tensors = {k: v for k, v in TENSORS.items() if not (legacy and k in ("u16", "f8"))}
    path = _save(tmp_path, tensors, legacy=legacy)
    ckpt = read_checkpoint(path)
    assert ckpt.kind == ("torch-legacy" if legacy else "torch-zip")
    for name, t in tensors.items():
        ref = ckpt.root[name]
        assert isinstance(ref, TensorRef)
        assert ref.dtype == str(t.dtype).removeprefix("torch.")
        assert ref.shape == tuple(t.shape) and ref.stride == t.stride()
        assert ref.storage_offset == t.storage_offset()
        assert ref.parameter == isinstance(t, torch.nn.Parameter)
        if t.is_contiguous():
            raw = load_tensor(ckpt, ref).reshape(-1).view(torch.uint8)
            assert torch.equal(raw, t.detach().reshape(-1).view(torch.uint8))


def test_scalars_decode_bit_exact_without_torch(tmp_path):
    values = {"f32": torch.tensor(0.1), "f64": torch.tensor(0.1, dtype=torch.float64),
              "bf16": torch.tensor(0.1, dtype=torch.bfloat16),
              "f16": torch.tensor(0.1, dtype=torch.float16), "i": torch.tensor(-3)}
    ckpt = read_checkpoint(_save(tmp_path, values))
    for name, t in values.items():
        assert ckpt.scalar(ckpt.root[name]) == t.item()


def test_unknown_classes_are_opaque_and_never_imported(tmp_path):
    obj = {"args": argparse.Namespace(lr=0.1), "cfg": Config(), "n": 1}
    ckpt = read_checkpoint(_save(tmp_path, obj))
    args, cfg = ckpt.root["args"], ckpt.root["cfg"]
    assert isinstance(args, Opaque) and args.dotted == "argparse.Namespace"
    assert args.state == {"lr": 0.1}
    assert cfg.dotted == f"{__name__}.Config" and cfg.state == {"depth": 3}
    # A module named only by the pickle is never imported.
    data = b"\x80\x02cckpttool_canary_module\nThing\n)\x81."
    value, seen = safe_loads(data)
    assert seen == ["ckpttool_canary_module.Thing"]
    assert "ckpttool_canary_module" not in sys.modules
    assert isinstance(value, Opaque)


def _malicious_pickle(command: str) -> bytes:
    # GLOBAL posix.system, (command,), REDUCE: what pickling os.system(command) produces.
    return (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"posix\nsystem\n" + pickle.BINUNICODE
            + struct.pack("<I", len(command)) + command.encode() + pickle.TUPLE1
            + pickle.REDUCE + pickle.STOP)


def _write_zip(path, pickle_bytes):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("container", ["zip", "legacy", "nested"])
def test_malicious_pickle_is_reported_and_never_run(tmp_path, container):
    canary = tmp_path / "canary"
    payload = _malicious_pickle(f"touch {canary}")
    path = tmp_path / "evil.pt"
    if container == "zip":
        _write_zip(path, payload)
    elif container == "legacy":
        path.write_bytes(payload)
    else:  # the call buried inside an otherwise ordinary state dict
        inner = payload[2:-1]  # drop PROTO and STOP, keep the GLOBAL..REDUCE sequence
        body = (b"\x80\x02}q\x00(X\x05\x00\x00\x00modelq\x01}X\x04\x00\x00\x00evilq\x02"
                + inner + b"u.")
        _write_zip(path, body)
    with pytest.raises(UnsafeCheckpointError, match="posix.system") as info:
        load(path)
    assert "nothing was executed" in str(info.value)
    assert not canary.exists()


def test_memo_bomb_walks_in_linear_time():
    # Each list holds the previous one twice: 2**60 paths, 60 distinct objects.
    ops = [pickle.PROTO + b"\x02", pickle.EMPTY_LIST, pickle.BINPUT + b"\x00"]
    for i in range(1, 61):
        prev = pickle.BINGET + bytes([i - 1])
        ops += [pickle.EMPTY_LIST, prev, pickle.APPEND, prev, pickle.APPEND,
                pickle.BINPUT + bytes([i])]
    data = b"".join(ops) + pickle.STOP
    value, _ = safe_loads(data)
    assert sum(1 for _ in walk(value)) < 200


def test_deep_nesting_is_a_clean_error(tmp_path):
    data = pickle.PROTO + b"\x02" + pickle.EMPTY_LIST * 2000 + pickle.APPEND * 1999 + pickle.STOP
    path = tmp_path / "deep.pt"
    _write_zip(path, data)
    with pytest.raises(InputError, match="nests"):
        load(path)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b'{"lr": 0.1}', "JSON"),
    (struct.pack("<Q", 2) + b'{}', "safetensors"),
    (bytes(range(256)) * 4, "not a torch checkpoint"),
    (b"PK\x03\x04" + b"\0" * 100, "damaged zip"),
])
def test_bad_bytes_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_checkpoint(path)


def test_truncated_zip_and_corrupted_pickle(tmp_path):
    good = _save(tmp_path, {"optimizer": {"state": {}, "param_groups": []}}, "good.pt")
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated|damaged"):
        read_checkpoint(cut)
    corrupt = tmp_path / "corrupt.pt"
    _write_zip(corrupt, b"\x80\x02}q\x00(X\x05\x00\x00\x00\xff\xfe\x00")
    with pytest.raises(InputError, match="corrupted"):
        read_checkpoint(corrupt)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(InputError, match="directory"):
        read_checkpoint(tmp_path)


def test_reading_does_not_import_torch(tmp_path):
    path = _save(tmp_path, {"optimizer": torch.optim.SGD([torch.nn.Parameter(torch.ones(1))],
                                                         lr=0.1).state_dict()})
    code = ("import sys, ckpttool\n"
            f"c = ckpttool.load({str(path)!r})\n"
            "assert c.optimizers[0].cls == 'SGD', c.optimizers\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_storage_bytes_are_read_lazily(tmp_path, monkeypatch):
    big = torch.zeros(1_000_000)
    path = _save(tmp_path, {"w": big, "lr": torch.tensor(0.5)})
    reads: list[int] = []
    real_open = open

    class Spy(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            reads.append(len(data))
            return data

    def spy_open(file, mode="r", *a, **k):
        if str(file) == str(path) and "b" in mode:
            return io.BufferedReader(Spy(file, "r"))
        return real_open(file, mode, *a, **k)

    import builtins
    monkeypatch.setattr(builtins, "open", spy_open)
    ckpt = read_checkpoint(path)
    assert ckpt.scalar(ckpt.root["lr"]) == 0.5
    assert sum(reads) < 100_000  # the 4 MB tensor was never read
