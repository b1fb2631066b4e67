"""torch.distributed.checkpoint folders: show and diff read .metadata and the small non-tensor
entries, never a tensor shard; values agree with what DCP itself loads; damaged metadata is one
line and exit 2."""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT
from test_cli import _check_show_schema
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from ckpttool.dcp import DCPDir, _MetadataUnpickler, read_dcp
from ckpttool.errors import EXIT_DIFFERENT, EXIT_ERROR, EXIT_OK
from ckpttool.serialization import TensorRef, load_tensor, walk

DCP = ROOT / "fixtures" / "dirs" / "dcp"
SINGLE, TWO_RANKS = DCP / "single", DCP / "two_ranks"
BOTH = [pytest.param(SINGLE, id="single"), pytest.param(TWO_RANKS, id="two_ranks")]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # dcp.save / dcp_to_torch_save without a process group: "assuming ... single process"
        warnings.simplefilter("ignore")
        yield


def _oracle(folder: Path, tmp_path: Path) -> dict:
    """The folder as torch.distributed.checkpoint itself loads it (into one torch.save file)."""
    out = tmp_path / f"{folder.name}-oracle.pt"
    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=False)


def _resave(folder: Path, tmp_path: Path, name: str, edit) -> Path:
    """A copy of the folder's state saved again with dcp.save after ``edit(state)``."""
    state = _oracle(folder, tmp_path)
    edit(state)
    out = tmp_path / name
    dcp.save(state, checkpoint_id=str(out))
    return out


def _full(ckpt: DCPDir, ref: TensorRef) -> torch.Tensor:
    """A tensor of the folder, assembled from its chunks the way ckpttool locates them."""
    chunks = ckpt.tensor_chunks(ref)
    if chunks is None:
        return load_tensor(ckpt, ref)
    out = torch.empty(ref.shape, dtype=getattr(torch, ref.dtype))
    for offsets, piece in chunks:
        out[tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))] = load_tensor(ckpt, piece)
    return out


# --- show ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", BOTH)
def test_show(run_cli, folder):
    result = run_cli("show", "--json", folder)
    assert result.exit_code == EXIT_OK, result.stderr
    doc = json.loads(result.stdout)
    _check_show_schema(doc)
    assert doc["kind"] == "dcp"
    [opt] = doc["optimizers"]
    assert (opt["location"], opt["class"]) == ("optim", "AdamW")
    assert [g["lr"] for g in opt["groups"]] == [0.0005, 0.00025]
    assert [g["initial_lr"] for g in opt["groups"]] == [0.001, 0.0005]
    assert [g["num_params"] for g in opt["groups"]] == [2, 2]
    assert [g["hyper"]["weight_decay"] for g in opt["groups"]] == [0.01, 0.0]
    assert opt["state"]["params_with_state"] == 4 and opt["state"]["step"] == 5.0
    [sched] = doc["schedulers"]
    assert (sched["location"], sched["class"], sched["optimizer"]) == ("scheduler", "MultiStepLR",
                                                                       "optim")
    assert sched["args"] == {"milestones": [3, 6, 6], "gamma": 0.5}
    assert (sched["last_epoch"], sched["step_count"]) == (5, 6)
    assert sched["base_lrs"] == [0.001, 0.0005] and sched["last_lr"] == [0.0005, 0.00025]
    assert sched["unrecoverable"] == []
    assert doc["findings"] == []  # no spurious finding, no unreadable state
    text = run_cli("show", folder)
    assert "[scheduler] MultiStepLR(milestones=[3, 6, 6], gamma=0.5)" in text.stdout
    assert "drives [optim]" in text.stdout


def test_tree_keeps_fqns_and_restores_torch_int_keys():
    single, sharded = read_dcp(SINGLE), read_dcp(TWO_RANKS)
    # a raw optimizer.state_dict(): state keys match the groups' int params again
    assert list(single.root["optim"]["state"]) == [0, 1, 2, 3]
    assert [g["params"] for g in single.root["optim"]["param_groups"]] == [[0, 1], [2, 3]]
    # FQN-keyed (get_state_dict): strings with dots, never split
    assert list(sharded.root["optim"]["state"]) == ["0.weight", "2.weight", "0.bias", "2.bias"]
    assert list(sharded.root["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for ckpt in (single, sharded):
        milestones = ckpt.root["scheduler"]["milestones"]
        assert isinstance(milestones, Counter) and milestones == Counter({3: 1, 6: 2})
        assert all(type(k) is int for k in milestones)
        assert isinstance(ckpt.root["optim"]["param_groups"], list)
    # sharded tensors: one TensorRef of the full shape, its chunks apart
    ref = sharded.root["model"]["0.weight"]
    assert (ref.dtype, ref.shape) == ("float32", (3, 4))
    assert [(o, p.shape) for o, p in sharded.tensor_chunks(ref)] == [((0, 0), (2, 4)),
                                                                      ((2, 0), (1, 4))]
    assert single.tensor_chunks(single.root["model"]["0.weight"]) is None
    step = sharded.root["optim"]["state"]["0.weight"]["step"]
    assert step.shape == () and sharded.tensor_chunks(step) is None


@pytest.mark.parametrize("folder", BOTH)
def test_values_equal_what_dcp_loads(folder, tmp_path):
    ours = read_dcp(folder)
    theirs = _oracle(folder, tmp_path)
    assert ours.root["optim"]["param_groups"] == theirs["optim"]["param_groups"]
    sched = dict(ours.root["scheduler"])
    # DCP itself hands the milestones back with string keys (torch-scheduler-state.md 8)
    sched["milestones"] = {str(k): v for k, v in sched["milestones"].items()}
    assert sched == theirs["scheduler"]
    state = {str(k): v for k, v in ours.root["optim"]["state"].items()}
    assert state.keys() == theirs["optim"]["state"].keys()
    tensors = 0
    for path, value in walk(ours.root):
        if isinstance(value, TensorRef):
            expected = theirs
            for key in path:
                expected = expected[str(key) if path[:2] == ("optim", "state") else key]
            got = _full(ours, value)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected), path
            tensors += 1
    assert tensors == 16


# --- show reads no tensor data ---------------------------------------------------------------


def _entries(folder: Path) -> tuple[list, list]:
    """(tensor entries of more than one element, bytes entries) as (file, start, end), from
    the trusted fixture's .metadata unpickled by pickle itself."""
    with open(folder / ".metadata", "rb") as f:
        meta = pickle.load(f)
    big, small = [], []
    for index, info in meta.storage_data.items():
        md = meta.state_dict_metadata[index.fqn]
        where = (info.relative_path, info.offset, info.offset + info.length)
        if hasattr(md, "size"):
            if md.size.numel() > 1:
                big.append(where)
        else:
            small.append(where)
    return big, small


@pytest.mark.parametrize("folder", BOTH)
def test_show_reads_no_tensor_chunk(run_cli, monkeypatch, folder):
    reads: list[tuple[str, int, int]] = []
    real_open = builtins.open

    class Spy:
        def __init__(self, f, name):
            self._f, self._name = f, name

        def read(self, n=-1):
            start = self._f.tell()
            data = self._f.read(n)
            reads.append((self._name, start, start + len(data)))
            return data

        def readinto(self, buffer):
            start = self._f.tell()
            n = self._f.readinto(buffer)
            reads.append((self._name, start, start + (n or 0)))
            return n

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def spy_open(file, *args, **kwargs):
        f = real_open(file, *args, **kwargs)
        name = os.path.basename(os.fspath(file)) if not isinstance(file, int) else ""
        return Spy(f, name) if name.endswith(".distcp") else f

    monkeypatch.setattr(builtins, "open", spy_open)
    result = run_cli("show", folder)
    monkeypatch.undo()
    assert result.exit_code == EXIT_OK and "MultiStepLR" in result.stdout
    big, small = _entries(folder)
    assert reads and all(a < b for _, a, b in reads if b > a)
    touched = [(n, a, b) for n, a, b in reads if b > a]
    for name, start, end in touched:
        assert not any(name == f and start < e and s < end for f, s, e in big), \
            f"show read bytes {start}-{end} of {name}, inside a tensor chunk"
    # every bytes entry was read, and nothing outside the entries
    assert all(any(n == f and a >= s and b <= e for n, a, b in touched) for f, s, e in small)


def test_show_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "ckpttool", "show",
                           str(TWO_RANKS)], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "torch" not in imported and "deepdiff" not in imported


def test_metadata_index_records_hash_apart():
    """storage_data's keys must not all collide (n**2 to build the dict of a large run)."""
    data = (TWO_RANKS / ".metadata").read_bytes()
    meta = _MetadataUnpickler(io.BytesIO(data)).load()
    keys = list(meta.state["storage_data"])
    assert len({hash(k) for k in keys}) == len(keys) == 63


# --- diff ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", BOTH)
def test_diff_with_itself_is_equal(run_cli, folder):
    result = run_cli("diff", "--json", folder, folder)
    assert result.exit_code == EXIT_OK, result.stderr
    doc = json.loads(result.stdout)
    assert doc["equal"] is True and doc["changes"] == []


@pytest.mark.parametrize("folder", BOTH)
def test_diff_finds_one_changed_bytes_entry(run_cli, folder, tmp_path):
    def edit(state):
        state["optim"]["param_groups"][0]["lr"] = 0.125

    changed = _resave(folder, tmp_path, "lr", edit)
    # two_ranks against a one-process save: the tensors are compared across chunk grids
    result = run_cli("diff", "--json", folder, changed)
    assert result.exit_code == EXIT_DIFFERENT, result.stderr
    doc = json.loads(result.stdout)
    assert [(c["path"], c["kind"], c["a"], c["b"]) for c in doc["changes"]] == [
        ("optim/param_groups/0/lr", "value", 0.0005, 0.125)]


@pytest.mark.parametrize("folder", BOTH)
def test_diff_finds_one_changed_element(run_cli, folder, tmp_path):
    def edit(state):
        state["model"]["0.weight"][2, 1] += 1.0  # two_ranks: in the second chunk

    # two_ranks against a one-chunk save: the overlaps of the two grids are compared
    changed = _resave(folder, tmp_path, "weight", edit)
    doc = json.loads(run_cli("diff", "--json", folder, changed).stdout)
    [change] = doc["changes"]
    assert (change["path"], change["kind"], change["n_diff"], change["numel"]) == (
        "model/0.weight", "tensor", 1, 12)
    assert change["max_abs"] == pytest.approx(1.0, abs=1e-6)


def test_diff_of_sharded_tensors_chunk_by_chunk(run_cli, tmp_path):
    """Same sharding on both sides: one element of the second chunk changed in place."""
    copy = tmp_path / "two_ranks"
    shutil.copytree(TWO_RANKS, copy)
    ckpt = read_dcp(copy)
    ref = ckpt.root["model"]["0.weight"]
    [piece] = [p for offsets, p in ckpt.tensor_chunks(ref) if offsets == (2, 0)]
    path, offset, _ = ckpt.locate(piece.storage, 1 * 4, 4)  # element [2, 1]
    (old,) = struct.unpack("<f", ckpt.read_storage(piece.storage, 4, 4))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<f", old + 0.5))
    doc = json.loads(run_cli("diff", "--json", TWO_RANKS, copy).stdout)
    [change] = doc["changes"]
    assert (change["path"], change["n_diff"], change["numel"]) == ("model/0.weight", 1, 12)
    assert change["max_abs"] == pytest.approx(0.5, rel=1e-6)


def test_diff_across_shardings_agrees_with_torch(run_cli, tmp_path):
    single, sharded = _oracle(SINGLE, tmp_path), _oracle(TWO_RANKS, tmp_path)
    differ = sorted(f"model/{k}" for k in single["model"]
                    if not torch.equal(single["model"][k], sharded["model"][k]))
    doc = json.loads(run_cli("diff", "--json", "--only", "tensors", SINGLE, TWO_RANKS).stdout)
    found = sorted(c["path"] for c in doc["changes"]
                   if c["kind"] == "tensor" and c["path"].startswith("model/"))
    assert found == differ


# --- other states and damage ---------------------------------------------------------------------


def test_non_tensor_entry_refused_by_weights_only_is_an_info_finding(run_cli, tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    state = {"model": model.state_dict(), "optim": opt.state_dict(),
             "scheduler": sched.state_dict(), "args": argparse.Namespace(lr=0.1)}
    dcp.save(state, checkpoint_id=str(tmp_path / "ns"))
    doc = json.loads(run_cli("show", "--json", tmp_path / "ns").stdout)
    assert [o["class"] for o in doc["optimizers"]] == ["SGD"]  # its empty state, given back
    assert [s["class"] for s in doc["schedulers"]] == ["StepLR"]
    assert [(f["code"], f["location"]) for f in doc["findings"]] == [
        ("weights-only-refused", "args")]
    assert "argparse.Namespace" in doc["findings"][0]["message"]


def _damaged(tmp_path: Path, name: str, edit=None, raw: bytes | None = None) -> Path:
    out = tmp_path / name
    shutil.copytree(TWO_RANKS, out)
    if raw is None:
        with open(TWO_RANKS / ".metadata", "rb") as f:
            meta = pickle.load(f)  # the committed fixture: trusted
        edit(meta)
        raw = pickle.dumps(meta, protocol=4)
    (out / ".metadata").write_bytes(raw)
    return out


def _storage(meta, n: int):
    return list(meta.storage_data.values())[n]


METADATA = (TWO_RANKS / ".metadata").read_bytes()
DAMAGE = {
    "truncated": {"raw": METADATA[: len(METADATA) // 2]},
    "random": {"raw": bytes(range(256)) * 8},
    "empty": {"raw": b""},
    "not-metadata": {"raw": pickle.dumps({"a": 1}, protocol=4)},
    "parent-path": {"edit": lambda m: setattr(_storage(m, 0), "relative_path", "../x")},
    "absolute-path": {"edit": lambda m: setattr(_storage(m, 20), "relative_path", "/etc/passwd")},
    "subfolder-path": {"edit": lambda m: setattr(_storage(m, 20), "relative_path", "a/b.distcp")},
    "past-the-end": {"edit": lambda m: setattr(_storage(m, 20), "offset", 10**6)},
    "negative-length": {"edit": lambda m: setattr(_storage(m, 20), "length", -1)},
    "shifted-entry": {"edit": lambda m: setattr(_storage(m, 20), "offset",
                                                _storage(m, 20).offset + 1)},
    "missing-shard": {"edit": lambda m: setattr(_storage(m, 20), "relative_path",
                                                "__7_0.distcp")},
    "chunk-outside": {"edit": lambda m: setattr(
        m.state_dict_metadata["model.0.weight"].chunks[1], "sizes", torch.Size([2, 4]))},
    "overlapping-paths": {"edit": lambda m: m.planner_data.__setitem__(
        "scheduler.gamma", ("scheduler", "milestones"))},
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_metadata_is_one_line_and_exit_2(run_cli, tmp_path, name):
    folder = _damaged(tmp_path, name, **DAMAGE[name])
    for args in (["show", folder], ["diff", TWO_RANKS, folder]):
        result = run_cli(*args)
        assert result.exit_code == EXIT_ERROR, (name, result.stdout)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ckpttool: error: "), result.stderr
        assert "Traceback" not in result.stderr


def test_code_in_metadata_is_refused_unrun(run_cli, tmp_path):
    marker = tmp_path / "ran"
    raw = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    folder = _damaged(tmp_path, "hostile", raw=raw)
    result = run_cli("show", folder)
    assert result.exit_code == EXIT_ERROR and "os.system" in result.stderr
    assert "nothing was executed" in result.stderr and not marker.exists()
