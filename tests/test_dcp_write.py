"""Rescheduled torch.distributed.checkpoint folders (ckpttool.dcp_write): every shard copied byte
for byte, the changed entries in one new shard exactly as dcp.save writes them, a new .metadata;
the output loads with dcp.load into real objects and resumes bit-exactly, in one process and in
two ranks of a gloo group (FSDP2), as a run that used the new schedule from step 0."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import socket
import warnings
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT, record_durability
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
from torch.optim import lr_scheduler as lrs

import ckpttool
from ckpttool.dcp import StoredTensor, read_dcp
from ckpttool.dcp_write import NEW_SHARD, flatten, write_dcp
from ckpttool.errors import EXIT_OK, StateError
from ckpttool.serialization import NewTensor, TensorRef, new_tensor_from_torch

DCP = ROOT / "fixtures" / "dirs" / "dcp"
SINGLE, TWO_RANKS = DCP / "single", DCP / "two_ranks"
RESUMED = 20  # steps compared after the resume


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # dcp.save / dcp.load without a process group: "assuming ... single process"
        warnings.simplefilter("ignore")
        yield


# --- the fixtures' run, and the new schedules ----------------------------------------------------


def _model() -> nn.Sequential:
    """The fixtures' 4 -> 3 -> 2 MLP."""
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _adamw(params: list) -> torch.optim.AdamW:
    """The fixtures' optimizer over (0.weight, 0.bias, 2.weight, 2.bias): weight / bias groups."""
    w0, b0, w2, b2 = params
    return torch.optim.AdamW([{"params": [w0, w2], "weight_decay": 0.01},
                              {"params": [b0, b2], "weight_decay": 0.0, "lr": 5e-4}], lr=1e-3)


def _cosine(opt):
    return lrs.CosineAnnealingLR(opt, T_max=30, eta_min=1e-5)


COSINE = "CosineAnnealingLR(T_max=30, eta_min=1e-05)"  # _cosine as a SPEC


def _multistep(opt):
    return lrs.MultiStepLR(opt, milestones=[2, 8, 8, 11], gamma=0.5)


def _lrs(opt, sched, steps: int) -> list:
    """The group lrs after each of ``steps`` optimizer + scheduler steps."""
    out = []
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append([g["lr"].item() if torch.is_tensor(g["lr"]) else g["lr"]
                    for g in opt.param_groups])
    return out


def _from_scratch(make, steps: int, params=None, opt_cls=_adamw):
    """The run that used the new schedule from step 0: (optimizer, scheduler) after ``steps``
    steps, then the lrs of the next RESUMED steps (computed on copies)."""
    params = params or [torch.zeros(1, requires_grad=True) for _ in range(4)]
    opt = opt_cls(params)
    sched = make(opt)
    for _ in range(steps):
        opt.step()
        sched.step()
    o2, s2 = copy.deepcopy((opt, sched))
    return opt, sched, _lrs(o2, s2, RESUMED)


def _rescheduled(src, make, steps: int, *, optim="optim", scheduler="scheduler", opt_cls=_adamw):
    """``src.root`` rewritten as the planner does: the groups' lr / initial_lr and the
    scheduler state from the real torch scheduler replayed ``steps`` steps; every other value
    the same object. Returns (root, lrs of the resumed steps)."""
    opt, sched, expected = _from_scratch(make, steps, opt_cls=opt_cls)
    root = dict(src.root)
    root[optim] = dict(root[optim])

    def value(v):
        return new_tensor_from_torch(v) if torch.is_tensor(v) else copy.deepcopy(v)

    root[optim]["param_groups"] = [
        {**g, "lr": value(n["lr"]), "initial_lr": value(n["initial_lr"])}
        for g, n in zip(root[optim]["param_groups"], opt.param_groups)]
    root[scheduler] = {k: ([value(x) for x in v] if isinstance(v, list) else value(v))
                       for k, v in sched.state_dict().items()}
    return root, expected


def _raw_template(model: nn.Module, opt) -> dict:
    """A raw optimizer.state_dict() with its state allocated, so that dcp.load fills it (a
    fresh optimizer's empty state would load no moments, silently)."""
    sd = opt.state_dict()
    for i, p in enumerate(model.parameters()):
        sd["state"][i] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                          "exp_avg_sq": torch.zeros_like(p)}
    return sd


def _resume_single(folder: Path, make, make_opt=None) -> tuple[nn.Module, object, object]:
    """Load a raw-state folder the documented way: model, optimizer (``make_opt``, default
    the fixture's AdamW), the new scheduler constructed, then dcp.load into their state dicts
    and load_state_dict each."""
    torch.manual_seed(99)  # other weights than the saved ones: the load must bring them
    model = _model()
    w0, b0, w2, b2 = model.parameters()
    opt = (make_opt or _adamw)([w0, b0, w2, b2])
    # state ids follow the groups: 0.weight, 2.weight, 0.bias, 2.bias
    sched = make(opt)
    state = {"model": model.state_dict(), "optim": _raw_template(_Ordered(model), opt),
             "scheduler": sched.state_dict()}
    dcp.load(state, checkpoint_id=str(folder))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    sched.load_state_dict(state["scheduler"])
    return model, opt, sched


class _Ordered:
    """The model's parameters in the optimizer's id order (the groups' order)."""

    def __init__(self, model: nn.Module):
        w0, b0, w2, b2 = model.parameters()
        self.params = [w0, w2, b0, b2]

    def parameters(self):
        return iter(self.params)


def _oracle(folder: Path, tmp_path: Path) -> dict:
    """The folder as torch.distributed.checkpoint itself loads it (into one torch.save file)."""
    out = tmp_path / f"{folder.name}-oracle.pt"
    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _digest(folder: Path) -> dict[str, str]:
    return {n: hashlib.sha256(b).hexdigest() for n, b in _files(folder).items()}


def _metadata(folder: Path):
    with open(folder / ".metadata", "rb") as f:  # our own output and dcp.save's: trusted here
        return pickle.load(f)


def _entry_bytes(folder: Path, md) -> dict[tuple, bytes]:
    """Every stored entry's bytes, by (flat key, chunk offsets)."""
    out = {}
    for index, info in md.storage_data.items():
        with open(folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            out[(index.fqn, tuple(index.offset) if index.offset is not None else None)] = \
                f.read(info.length)
    return out


# --- flattening as dcp.save does -----------------------------------------------------------------


def test_flatten_agrees_with_dcp_on_real_state_dicts():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    seq = lrs.SequentialLR(opt, [lrs.LinearLR(opt, 0.1, total_iters=2), _multistep(opt)],
                           milestones=[2])
    for _ in range(3):
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
        seq.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "sched": seq.state_dict(),
             "odd": {"empty": {}, "nested": [[1, 2], [], {"a": (1, torch.ones(1))}],
                     "tuple": (torch.zeros(2), 3), 5: [torch.ones(1), 0.5], "none": None}}
    flat, mapping = flatten_state_dict(state)
    ours = flatten(state)
    assert [k for k, _, _ in ours] == list(flat)
    assert all(path == mapping[k] and leaf is flat[k] for k, path, leaf in ours)
    # a Counter's keys are stringified, list indices stay ints, like dcp.save's planner_data
    assert ("sched", "_schedulers", 1, "milestones", "8") in {p for _, p, _ in ours}


def test_flatten_refuses_two_entries_of_one_key():
    with pytest.raises(StateError, match="flatten to the key 'a.1'"):
        flatten({"a": {1: 0.5, "1": 0.25}})


# --- one process: dcp/single ---------------------------------------------------------------------


def test_single_resumes_bit_exact_and_keeps_everything_else(tmp_path):
    src = read_dcp(SINGLE)
    before = _digest(SINGLE)
    root, expected = _rescheduled(src, _cosine, 5)
    out = tmp_path / "out"
    seen = []
    write_dcp(src, root, out, progress=lambda done, total: seen.append((done, total)))

    assert _digest(SINGLE) == before  # the input untouched
    new = NEW_SHARD.format(0)
    assert sorted(os.listdir(out)) == sorted([".metadata", "__0_0.distcp", new])
    assert (out / "__0_0.distcp").read_bytes() == (SINGLE / "__0_0.distcp").read_bytes()
    st, st_src = os.stat(out / "__0_0.distcp"), os.stat(SINGLE / "__0_0.distcp")
    assert st.st_nlink == 1 and st.st_ino != st_src.st_ino  # a copy, never a link
    written = sum(os.path.getsize(out / name) for name in os.listdir(out))
    # one progress over the folder (copies, new shard, .metadata), its total exact from the start
    assert seen[-1] == (written, written) and {t for _, t in seen} == {written}

    model, opt, sched = _resume_single(out, _cosine)
    assert _lrs(opt, sched, RESUMED) == expected
    # model weights and Adam moments are the input's, bit for bit
    original = _oracle(SINGLE, tmp_path)
    for name, t in model.state_dict().items():
        assert torch.equal(t, original["model"][name]), name
    for i, per_param in opt.state_dict()["state"].items():
        for k, t in per_param.items():
            assert torch.equal(t, original["optim"]["state"][str(i)][k]), (i, k)


@pytest.mark.parametrize("folder", [SINGLE, TWO_RANKS], ids=["single", "two_ranks"])
def test_entries_are_what_dcp_save_writes(folder, tmp_path):
    """The output's .metadata lists the keys, paths and kinds dcp.save lists for the same
    state, and each rewritten entry holds the very bytes dcp.save writes for it; kept entries
    point at the input's bytes."""
    src = read_dcp(folder)
    root, _ = _rescheduled(src, _cosine, 5)
    out = tmp_path / "out"
    write_dcp(src, root, out)

    # dcp.save of the same state, as real objects
    state = _oracle(folder, tmp_path)
    opt, sched, _ = _from_scratch(_cosine, 5)
    for g, n in zip(state["optim"]["param_groups"], opt.param_groups):
        g["lr"], g["initial_lr"] = n["lr"], n["initial_lr"]
    state["scheduler"] = sched.state_dict()
    if folder == SINGLE:  # the oracle loads DCP's str state keys; dcp.save saw ints
        state["optim"]["state"] = {int(k): v for k, v in state["optim"]["state"].items()}
    theirs = tmp_path / "dcp-save"
    dcp.save(state, checkpoint_id=str(theirs))

    ours_md, theirs_md = _metadata(out), _metadata(theirs)
    assert ours_md.planner_data == theirs_md.planner_data
    assert ours_md.state_dict_metadata.keys() == theirs_md.state_dict_metadata.keys()
    for key, md in ours_md.state_dict_metadata.items():
        other = theirs_md.state_dict_metadata[key]
        assert type(md) is type(other), key
        if folder == SINGLE:  # one chunk per tensor on both sides
            assert md == other, key
    ours_bytes, theirs_bytes = _entry_bytes(out, ours_md), _entry_bytes(theirs, theirs_md)
    new_keys = set()
    for index, info in ours_md.storage_data.items():
        if info.relative_path == NEW_SHARD.format(0):
            new_keys.add(index.fqn)
            assert ours_bytes[(index.fqn, None)] == theirs_bytes[(index.fqn, None)], index.fqn
    assert new_keys == {"optim.param_groups.0.lr", "optim.param_groups.1.lr", "scheduler.T_max",
                        "scheduler.eta_min", "scheduler._last_lr"}
    # kept entries: the input's bytes, where the input's metadata put them
    src_md = read_dcp(folder).entries
    for index, info in ours_md.storage_data.items():
        if info.relative_path != NEW_SHARD.format(0):
            where = src_md[index.fqn][1]
            places = [where] if not isinstance(where, StoredTensor) else [
                c[2] for c in where.chunks if c[0] == tuple(index.offset)]
            assert (places[0].shard, places[0].offset, places[0].length) == (
                info.relative_path, info.offset, info.length), index.fqn
    assert ours_md.version == theirs_md.version
    assert ours_md.storage_meta.save_id != _metadata(folder).storage_meta.save_id


def test_show_and_diff_of_the_output(run_cli, tmp_path):
    src = read_dcp(SINGLE)
    root, _ = _rescheduled(src, _cosine, 5)
    out = tmp_path / "out"
    write_dcp(src, root, out)
    result = run_cli("show", "--json", out)
    assert result.exit_code == EXIT_OK, result.stderr
    doc = json.loads(result.stdout)
    (sched,) = doc["schedulers"]
    assert (sched["class"], sched["last_epoch"], sched["args"]) == (
        "CosineAnnealingLR", 5, {"T_max": 30, "eta_min": 1e-05})
    assert [f["code"] for f in doc["findings"] if f["severity"] == "error"] == []
    changed = {c.path for c in ckpttool.diff(SINGLE, out).changes}
    assert changed == {"optim/param_groups/0/lr", "optim/param_groups/1/lr",
                       "scheduler/milestones", "scheduler/gamma", "scheduler/T_max",
                       "scheduler/eta_min", "scheduler/_last_lr/0", "scheduler/_last_lr/1"}


# --- two ranks over gloo: dcp/two_ranks ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resume_rank(rank: int, world: int, port: int, folder: str, make, result: str) -> None:
    """One rank resuming from ``folder`` as make_fixtures' dcp_rank saved it: FSDP2 over a
    gloo group, get_state_dict -> dcp.load -> set_state_dict, the new scheduler constructed
    before; rank 0 saves the lrs of the next steps and the full model and optimizer state."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(99)  # other weights than the saved ones: the load must bring them
        model = _model()
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        opt = _adamw(list(model.parameters()))
        sched = make(opt)
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "scheduler": sched.state_dict()}
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        sched.load_state_dict(state["scheduler"])
        full = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        lrs_after = _lrs(opt, sched, RESUMED)
        if rank == 0:
            torch.save({"lrs": lrs_after, "model": full[0], "optim": full[1]}, result)
    finally:
        dist.destroy_process_group()


def _run_two_ranks(folder: Path, make, tmp_path: Path) -> dict:
    import torch.multiprocessing as mp

    result = tmp_path / "rank0.pt"
    for attempt in range(2):  # once more if the free port was taken before the ranks bound it
        try:
            mp.spawn(_resume_rank, args=(2, _free_port(), str(folder), make, str(result)),
                     nprocs=2)
            break
        except Exception:
            if attempt:
                raise
    return torch.load(result, weights_only=False)


def test_two_ranks_resume_bit_exact(tmp_path):
    """`ckpttool.reschedule(...).save(out)` of the two-rank FSDP2 folder; two ranks of a gloo
    group resume from it and follow the new schedule bit for bit, with the input's weights and
    moments."""
    out = tmp_path / "out"
    saved = ckpttool.reschedule(TWO_RANKS, scheduler=COSINE).save(out)
    assert saved.verified_steps == 10
    *_, expected = _from_scratch(_cosine, 5)
    for shard in ("__0_0.distcp", "__1_0.distcp"):
        assert (out / shard).read_bytes() == (TWO_RANKS / shard).read_bytes()

    got = _run_two_ranks(out, _cosine, tmp_path)
    assert got["lrs"] == expected
    original = _oracle(TWO_RANKS, tmp_path)
    for name, t in got["model"].items():
        assert torch.equal(t, original["model"][name]), name
    for fqn, per_param in got["optim"]["state"].items():
        for k, t in per_param.items():
            assert torch.equal(t, original["optim"]["state"][fqn][k]), (fqn, k)


# --- through ckpttool.reschedule and the CLI ---------------------------------------------------------


def test_cli_reschedule_of_single_resumes_bit_exact(run_cli, tmp_path):
    out = tmp_path / "out"
    result = run_cli("reschedule", SINGLE, "-o", out, "--scheduler", COSINE, "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    assert json.loads(result.stdout)["new"] == COSINE
    assert (out / "__0_0.distcp").read_bytes() == (SINGLE / "__0_0.distcp").read_bytes()
    *_, expected = _from_scratch(_cosine, 5)
    _, opt, sched = _resume_single(out, _cosine)
    assert _lrs(opt, sched, RESUMED) == expected


def _stored_in(folder: Path) -> dict[str, set[str]]:
    """Each flat key of a written folder -> the files its bytes lie in (its .metadata)."""
    out: dict[str, set[str]] = {}
    for index, info in _metadata(folder).storage_data.items():
        out.setdefault(index.fqn, set()).add(info.relative_path)
    return out


@pytest.mark.parametrize("options", [
    ["--set", "milestones=[3, 8]", "--scale-lr", "0.5"],
    ["--scheduler", COSINE],
    [],  # the stored schedule again: nothing stored anew
], ids=["set-and-scale", "other-class", "unchanged"])
def test_what_the_plan_says_changes_is_what_the_writer_changed(run_cli, tmp_path, options):
    """The dcp object of --json, planned without writing, names exactly the entries the written
    .metadata points at the new shard for, and those it no longer has; the text says the same."""
    out = tmp_path / "out"
    dry = json.loads(run_cli("reschedule", SINGLE, "--dry-run", "--json", *options).stdout)
    result = run_cli("reschedule", SINGLE, "-o", out, "--json", *options)
    assert result.exit_code == EXIT_OK, result.stderr
    doc = json.loads(result.stdout)
    assert doc["dcp"] == dry["dcp"] and doc["rewritten"] == dry["rewritten"]
    stored, before = _stored_in(out), _stored_in(SINGLE)
    shard = doc["dcp"]["shard"]
    assert sorted(doc["dcp"]["written"]) == sorted(k for k, files in stored.items()
                                                   if shard in files)
    assert sorted(doc["dcp"]["removed"]) == sorted(before.keys() - stored.keys())
    assert doc["dcp"]["copied"] == ["__0_0.distcp"] and doc["dcp"]["left_out"] == []
    assert sorted(os.listdir(out)) == sorted(doc["rewritten"] + doc["dcp"]["copied"])
    if not options:
        assert (shard, doc["dcp"]["written"], doc["rewritten"]) == (None, [], [".metadata"])
        return
    assert shard == NEW_SHARD.format(0) and doc["rewritten"] == [".metadata", shard]
    text = run_cli("reschedule", SINGLE, "--dry-run", *options).stdout
    n = len(doc["dcp"]["written"])
    assert (f"[dcp folder] rewritten: {n} entries ({', '.join(doc['dcp']['written'][:4])}, and "
            f"{n - 4} more) in a new shard {shard}, a new .metadata; ") in text
    assert text.count("[dcp folder]") == 1


def test_a_second_rewrite_says_which_shard_it_leaves_out(run_cli, tmp_path):
    ckpttool.reschedule(SINGLE, scheduler=COSINE).save(tmp_path / "once")
    plan = ckpttool.reschedule(tmp_path / "once", scheduler="StepLR(step_size=2)")
    assert plan.dcp.left_out == (NEW_SHARD.format(0),) and plan.dcp.copied == ("__0_0.distcp",)
    plan.save(tmp_path / "twice")
    assert sorted(os.listdir(tmp_path / "twice")) == [".metadata", "__0_0.distcp",
                                                      NEW_SHARD.format(1)]
    text = run_cli("reschedule", tmp_path / "once", "--dry-run", "--scheduler",
                   "StepLR(step_size=2)").stdout
    assert (f"\n[dcp folder] rewritten: 5 entries (optim.param_groups.0.lr, "
            "optim.param_groups.1.lr, scheduler.step_size, scheduler.gamma, and 1 more) in a new "
            f"shard {NEW_SHARD.format(1)}, a new .metadata; 2 entries dropped (scheduler.T_max, "
            "scheduler.eta_min); every other shard copied byte for byte "
            f"({NEW_SHARD.format(0)}, added by an earlier rewrite and no longer used, left "
            "out)\n") in text


def test_set_milestones_of_the_stored_multisteplr(tmp_path):
    """The fixture's own MultiStepLR (a Counter DCP stored with str keys) with other milestones:
    the stored class and gamma kept, the Counter written as dcp.save writes it."""
    out = tmp_path / "out"
    ckpttool.reschedule(SINGLE, sets=["milestones=[4, 9, 9]"]).save(out)

    def make(opt):
        return lrs.MultiStepLR(opt, milestones=[4, 9, 9], gamma=0.5)

    *_, expected = _from_scratch(make, 5)
    assert read_dcp(out).root["scheduler"]["milestones"] == Counter({4: 1, 9: 2})
    assert sorted(k for k in _metadata(out).planner_data if ".milestones." in k) == [
        "scheduler.milestones.4", "scheduler.milestones.9"]
    _, opt, sched = _resume_single(out, make)
    assert _lrs(opt, sched, RESUMED) == expected


def test_reschedule_adds_a_scheduler_to_a_folder_without_one(tmp_path):
    folder = _saved(tmp_path, None, steps=4)
    out = tmp_path / "out"
    plan = ckpttool.reschedule(folder, scheduler=COSINE)
    assert plan.scheduler == "scheduler" and plan.steps == 4
    plan.save(out)
    *_, expected = _from_scratch(_cosine, 4)
    _, opt, sched = _resume_single(out, _cosine)
    assert _lrs(opt, sched, RESUMED) == expected


def test_in_place_keeps_the_original_folder_as_bak(run_cli, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name, data in _files(SINGLE).items():
        (folder / name).write_bytes(data)
    result = run_cli("reschedule", folder, "--in-place", "--scheduler", COSINE)
    assert result.exit_code == EXIT_OK, result.stderr
    assert _files(tmp_path / "run.bak") == _files(SINGLE)
    assert read_dcp(folder).root["scheduler"]["T_max"] == 30
    assert sorted(os.listdir(tmp_path)) == ["run", "run.bak"]


# --- small folders saved here with dcp.save ------------------------------------------------------


def _saved(tmp_path: Path, make=None, steps: int = 6, opt_cls=_adamw, name="saved") -> Path:
    """dcp.save of a short real run: {"model", "optim" (raw state), "scheduler"} (no scheduler
    when ``make`` is None)."""
    torch.manual_seed(0)
    model = _model()
    w0, b0, w2, b2 = model.parameters()
    opt = opt_cls([w0, b0, w2, b2])
    sched = make(opt) if make else None
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched:
            sched.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    if sched:
        state["scheduler"] = sched.state_dict()
    folder = tmp_path / name
    dcp.save(state, checkpoint_id=str(folder))
    return folder


def test_multisteplr_counter_stored_as_dcp_save_stores_it(tmp_path):
    """A Counter of milestones: flat keys scheduler.milestones.<m> (str), the counts as values;
    read back as the int-keyed Counter; dcp.load gives what it gives for a dcp.save of the same
    state (its str-keys trap included), and the resume is bit-exact."""
    folder = _saved(tmp_path, _cosine)
    src = read_dcp(folder)
    root, expected = _rescheduled(src, _multistep, 6)
    out = tmp_path / "out"
    write_dcp(src, root, out)

    md = _metadata(out)
    assert {k: md.planner_data[k] for k in md.planner_data if ".milestones." in k} == {
        "scheduler.milestones.2": ("scheduler", "milestones", "2"),
        "scheduler.milestones.8": ("scheduler", "milestones", "8"),
        "scheduler.milestones.11": ("scheduler", "milestones", "11")}
    assert read_dcp(out).root["scheduler"]["milestones"] == Counter({2: 1, 8: 2, 11: 1})

    # the same state saved by dcp.save, loaded the same way: the same objects
    opt, sched, _ = _from_scratch(_multistep, 6)
    state = _oracle(folder, tmp_path)
    state["optim"]["state"] = {int(k): v for k, v in state["optim"]["state"].items()}
    for g, n in zip(state["optim"]["param_groups"], opt.param_groups):
        g["lr"], g["initial_lr"] = n["lr"], n["initial_lr"]
    state["scheduler"] = sched.state_dict()
    theirs = tmp_path / "dcp-save"
    dcp.save(state, checkpoint_id=str(theirs))
    _, opt_a, sched_a = _resume_single(out, _multistep)
    _, opt_b, sched_b = _resume_single(theirs, _multistep)
    assert sched_a.state_dict() == sched_b.state_dict()
    assert sched_a.milestones == Counter({2: 1, 8: 2, 11: 1, "2": 1, "8": 2, "11": 1})  # DCP's own
    assert opt_a.state_dict()["param_groups"] == opt_b.state_dict()["param_groups"]
    assert _lrs(opt_a, sched_a, RESUMED) == expected


def test_scheduler_added_where_none_was_stored(tmp_path):
    folder = _saved(tmp_path, None, steps=4)
    src = read_dcp(folder)
    root, expected = _rescheduled(src, _cosine, 4)
    assert "scheduler" not in src.root
    out = tmp_path / "out"
    write_dcp(src, root, out)
    added = {k for k in _metadata(out).planner_data if k.startswith("scheduler.")}
    assert added == {"scheduler." + k for k in root["scheduler"]} and "scheduler.T_max" in added
    _, opt, sched = _resume_single(out, _cosine)
    assert _lrs(opt, sched, RESUMED) == expected


def _adam_tensor_lr(params):
    w0, b0, w2, b2 = params
    return torch.optim.Adam([{"params": [w0, w2]}, {"params": [b0, b2]}],
                            lr=torch.tensor(0.01, dtype=torch.float64))


def test_tensor_lr_rewritten_as_new_tensor_entries(tmp_path):
    folder = _saved(tmp_path, _multistep, opt_cls=_adam_tensor_lr)
    src = read_dcp(folder)
    assert isinstance(src.root["optim"]["param_groups"][0]["lr"], TensorRef)
    root, expected = _rescheduled(src, _cosine, 6, opt_cls=_adam_tensor_lr)
    assert isinstance(root["optim"]["param_groups"][0]["lr"], NewTensor)
    out = tmp_path / "out"
    write_dcp(src, root, out)

    md = _metadata(out)
    new = {i.fqn for i, info in md.storage_data.items() if info.relative_path == NEW_SHARD.format(0)}
    assert {"optim.param_groups.0.lr", "scheduler._last_lr.0", "scheduler.T_max"} <= new
    lr_md = md.state_dict_metadata["optim.param_groups.0.lr"]
    assert (lr_md.properties.dtype, tuple(lr_md.size), len(lr_md.chunks)) == (torch.float64, (), 1)

    _, opt, sched = _resume_single(out, _cosine, _adam_tensor_lr)
    assert opt.param_groups[0]["lr"].dtype == torch.float64
    assert _lrs(opt, sched, RESUMED) == expected


# --- writing: durable, safe, repeatable ------------------------------------------------------------


def test_written_durably_and_never_renamed_inside(tmp_path, monkeypatch):
    src = read_dcp(SINGLE)
    root, _ = _rescheduled(src, _cosine, 5)
    events = record_durability(monkeypatch)
    write_dcp(src, root, tmp_path / "out")
    # three files (copied shard, new shard, .metadata), each fsynced, then the folder
    assert events == ["fsync file"] * 3 + ["fsync folder"]


def test_input_metadata_never_unpickled_by_pickle_or_torch(tmp_path, monkeypatch):
    src = read_dcp(SINGLE)
    root, _ = _rescheduled(src, _cosine, 5)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    write_dcp(src, root, tmp_path / "out")
    monkeypatch.undo()
    assert read_dcp(tmp_path / "out").root["scheduler"]["T_max"] == 30


def test_pending_folder_that_exists_is_refused(tmp_path):
    src = read_dcp(SINGLE)
    (tmp_path / "out").mkdir()
    with pytest.raises(StateError, match="exists"):
        write_dcp(src, src.root, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


def test_unchanged_tree_adds_no_shard(tmp_path):
    src = read_dcp(TWO_RANKS)
    write_dcp(src, src.root, tmp_path / "out")
    assert _files(tmp_path / "out").keys() == _files(TWO_RANKS).keys()
    ours, theirs = _metadata(tmp_path / "out"), _metadata(TWO_RANKS)
    assert ours.planner_data == theirs.planner_data
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data


def test_second_rewrite_drops_the_first_ones_shard(tmp_path):
    src = read_dcp(SINGLE)
    root, _ = _rescheduled(src, _cosine, 5)
    write_dcp(src, root, tmp_path / "once")
    again = read_dcp(tmp_path / "once")
    root2, expected = _rescheduled(again, _multistep, 5)
    write_dcp(again, root2, tmp_path / "twice")
    # everything the first shard held is replaced again: it is no longer needed
    assert sorted(os.listdir(tmp_path / "twice")) == [".metadata", "__0_0.distcp",
                                                      NEW_SHARD.format(1)]
    _, opt, sched = _resume_single(tmp_path / "twice", _multistep)
    assert _lrs(opt, sched, RESUMED) == expected


def test_other_files_and_folders_copied(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in _files(SINGLE).items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("run 7")
    (folder / "extra").mkdir()
    (folder / "extra" / "rng.pt").write_bytes(b"\x00" * 10)
    src = read_dcp(folder)
    root, _ = _rescheduled(src, _cosine, 5)
    write_dcp(src, root, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "run 7"
    assert (tmp_path / "out" / "extra" / "rng.pt").read_bytes() == b"\x00" * 10


def test_opaque_value_in_a_new_entry_is_refused(tmp_path):
    src = read_dcp(SINGLE)
    root = dict(src.root)
    root["extra"] = {"x": type("Odd", (), {})()}
    with pytest.raises(StateError, match="extra/x"):
        write_dcp(src, root, tmp_path / "out")



def test_a_folder_saved_without_flattening_keeps_its_entries(tmp_path):
    """dcp.save with DefaultSavePlanner(flatten_state_dict=False) stores each top-level value as
    one entry. The output keeps that layout (the model's entry where it lay, the changed ones
    stored anew as a whole), and dcp.load with the same planner loads it: the weights and
    moments as saved, the groups and the scheduler of a run that used the new schedule from
    step 0, which it then follows bit for bit."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

    torch.manual_seed(0)
    model = _model()
    opt = _adamw(list(model.parameters()))
    sched = _cosine(opt)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for _ in range(6):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    folder = tmp_path / "unflat"
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict(),
              "scheduler": sched.state_dict()}, checkpoint_id=str(folder),
             planner=DefaultSavePlanner(flatten_state_dict=False))
    assert sorted(_metadata(folder).state_dict_metadata) == ["model", "optim", "scheduler"]

    plan = ckpttool.reschedule(folder, scheduler="MultiStepLR(milestones=[2, 8, 8, 11], gamma=0.5)")
    assert plan.dcp.written == ("optim", "scheduler")
    plan.save(tmp_path / "out")
    ours, theirs = _metadata(tmp_path / "out"), _metadata(folder)
    assert sorted(ours.state_dict_metadata) == ["model", "optim", "scheduler"]
    assert ours.storage_data[MetadataIndex("model")] == theirs.storage_data[MetadataIndex("model")]

    def load(path):
        # (flatten_sharded_tensors=False: else the planner fills a copy of the dict)
        state = {"model": {}, "optim": {}, "scheduler": {}}
        dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(
            flatten_state_dict=False, flatten_sharded_tensors=False))
        return state

    before, after = load(folder), load(tmp_path / "out")
    for name, weight in before["model"].items():
        assert torch.equal(after["model"][name], weight)
    assert after["optim"]["state"].keys() == before["optim"]["state"].keys()
    for key, state in before["optim"]["state"].items():
        for name, value in state.items():
            assert torch.equal(after["optim"]["state"][key][name], value)
    ref_opt, ref_sched, expected = _from_scratch(_multistep, 6)
    assert after["scheduler"] == ref_sched.state_dict()
    assert [(g["lr"], g["initial_lr"]) for g in after["optim"]["param_groups"]] == [
        (g["lr"], g["initial_lr"]) for g in ref_opt.param_groups]
    opt2 = _adamw([torch.zeros(1, requires_grad=True) for _ in range(4)])
    sched2 = _multistep(opt2)
    opt2.load_state_dict({"state": {}, "param_groups": after["optim"]["param_groups"]})
    sched2.load_state_dict(after["scheduler"])
    assert _lrs(opt2, sched2, RESUMED) == expected


def test_an_entry_stored_inside_the_metadata_is_refused(tmp_path, run_cli):
    """An entry whose bytes lie in .metadata itself would point into the new .metadata of a
    rewrite: refused when the folder is read, one line."""
    folder = tmp_path / "odd"
    folder.mkdir()
    for name, data in _files(SINGLE).items():
        (folder / name).write_bytes(data)
    md = _metadata(folder)
    index = next(k for k in md.storage_data if k.fqn == "model.0.weight")
    info = md.storage_data[index]
    blob = (folder / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
    offset = 0
    for _ in range(5):  # the entry right after the pickle that names its offset
        md.storage_data[index] = _StorageInfo(".metadata", offset, info.length)
        data = pickle.dumps(md)
        if len(data) == offset:
            break
        offset = len(data)
    (folder / ".metadata").write_bytes(data + blob)
    result = run_cli("show", folder)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert ("the storage of 'model.0.weight' lies in .metadata itself, where "
            "torch.distributed.checkpoint stores no entry") in result.stderr


def test_entries_laid_out_otherwise_are_kept_or_refused(tmp_path):
    """Lists stored item by item (`scheduler.base_lrs.0`) stay so; a flat key that is not its
    path's (a layout no flattening gives) is refused rather than renamed."""
    folder = _saved(tmp_path, _cosine)
    md = _metadata(folder)
    for key, path in list(md.planner_data.items()):
        if path in (("scheduler", "base_lrs"), ("scheduler", "_last_lr")):
            del md.planner_data[key], md.state_dict_metadata[key]
            md.planner_data[key + ".0"], md.planner_data[key + ".1"] = path + (0,), path + (1,)
    index = {k.fqn: k for k in md.storage_data}
    blobs = (folder / "__0_0.distcp").read_bytes()
    extra = bytearray()
    for key in ("scheduler.base_lrs", "scheduler._last_lr"):  # each item an entry of its own
        info = md.storage_data.pop(index[key])
        values = torch.load(io.BytesIO(blobs[info.offset:info.offset + info.length]))
        for i, value in enumerate(values):
            blob = io.BytesIO()
            torch.save(value, blob)
            md.state_dict_metadata[f"{key}.{i}"] = BytesStorageMetadata()
            md.storage_data[MetadataIndex(f"{key}.{i}")] = _StorageInfo(
                "__1_0.distcp", len(extra), len(blob.getvalue()))
            extra += blob.getvalue()
    (folder / "__1_0.distcp").write_bytes(bytes(extra))
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    plan = ckpttool.reschedule(folder, sets=["T_max=60"])
    assert "scheduler._last_lr.0" in plan.dcp.written
    plan.save(tmp_path / "out")
    assert sorted(k for k in _metadata(tmp_path / "out").state_dict_metadata
                  if k.startswith(("scheduler.base_lrs", "scheduler._last_lr"))) == [
        "scheduler._last_lr.0", "scheduler._last_lr.1", "scheduler.base_lrs.0",
        "scheduler.base_lrs.1"]

    renamed = "scheduler.is_initial"  # the path stays ("scheduler", "_is_initial")
    md.planner_data[renamed] = md.planner_data.pop("scheduler._is_initial")
    md.state_dict_metadata[renamed] = md.state_dict_metadata.pop("scheduler._is_initial")
    md.storage_data[MetadataIndex(renamed)] = md.storage_data.pop(
        MetadataIndex("scheduler._is_initial"))
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(StateError, match="its entries are not stored as torch.distributed."
                                         "checkpoint stores a state dict"):
        ckpttool.reschedule(folder, sets=["T_max=60"]).save(tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
