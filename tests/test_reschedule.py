"""ckpttool reschedule: the resumed run is exactly the run that used the new schedule from step 0.

The oracle is real torch: a training run with schedule A is checkpointed at step N with
torch.save; ckpttool rewrites it to schedule B; a fresh optimizer and B are then loaded from the
rewritten file in the documented order and stepped 20 times. Every lr (and momentum/betas) must be
bit-identical to a run that used B from step 0, and every per-parameter state tensor must be
untouched.
"""

from __future__ import annotations

import copy
import os
import json
import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as L

import ckpttool
from ckpttool.errors import CkptToolError, EXIT_ERROR, EXIT_OK
from ckpttool.serialization import read_checkpoint
from conftest import FIXTURES, ROOT, record_durability
from test_schedulers import Spec, build, specs

REPLAYABLE = ["StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR",
              "PolynomialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR",
              "OneCycleLR", "SequentialLR", "ChainedScheduler"]
RESUMED_STEPS = 20
CYCLERS = ("CyclicLR", "OneCycleLR")


def spec_text(spec: Spec) -> str:
    """The SPEC string a user would type for `spec` (floats by repr: exact)."""
    args = [f"{k}={v!r}" for k, v in spec.kwargs.items()]
    if spec.children:
        args.insert(0, "schedulers=[" + ", ".join(spec_text(c) for c in spec.children) + "]")
    return f"{spec.cls}({', '.join(args)})"


def cycles(spec: Spec) -> bool:
    if spec.cls in CYCLERS:
        return spec.kwargs.get("cycle_momentum", True)
    return any(cycles(c) for c in spec.children)


def onecycle_total(spec: Spec) -> int | None:
    if spec.cls == "OneCycleLR":
        return spec.kwargs["total_steps"]
    totals = [t for c in spec.children if (t := onecycle_total(c)) is not None]
    return min(totals) if totals else None


def make_opt(opt_class: str, lrs: list, lr_dtype, momentum: float, n_params: list[int]):
    torch.manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(3)) for _ in range(n)],
               "lr": torch.tensor(lr, dtype=lr_dtype) if lr_dtype else lr}
              for n, lr in zip(n_params, lrs)]
    cls = getattr(torch.optim, opt_class)
    if opt_class == "SGD":
        return cls(groups, lr=lrs[0], momentum=momentum)
    return cls(groups, lr=lrs[0])


def step_once(opt, sched) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    sched.step()


def snapshot(opt) -> list:
    return [{k: copy.deepcopy(g[k]) for k in ("lr", "momentum", "betas") if k in g}
            for g in opt.param_groups]


def snapshots(opt, sched, steps: int) -> list:
    """The group values now (what the next step uses), then after each of ``steps`` steps."""
    out = [snapshot(opt)]
    for _ in range(steps):
        step_once(opt, sched)
        out.append(snapshot(opt))
    return out


def same(a: Any, b: Any) -> bool:
    """Bit-exact equality of snapshots (floats by bytes, tensors by dtype and bytes)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8),
                                                       b.reshape(-1).view(torch.uint8)))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex()
    return type(a) is type(b) and a == b


@st.composite
def cases(draw):
    n = draw(st.integers(1, 3))
    a = draw(specs(draw(st.sampled_from(REPLAYABLE)), n))
    b = draw(specs(draw(st.sampled_from(REPLAYABLE)), n))
    steps = draw(st.integers(0, 120))
    total_a = onecycle_total(a)
    if total_a is not None:
        steps = min(steps, total_a)
    total_b = onecycle_total(b)
    if total_b is not None and total_b < steps + RESUMED_STEPS:
        b = Spec(b.cls, b.kwargs, b.children)
        _stretch_onecycle(b, steps + RESUMED_STEPS)
    return {
        "opt_class": draw(st.sampled_from(["SGD", "Adam", "AdamW"])),
        "lrs": draw(st.lists(st.floats(1e-4, 1.0), min_size=n, max_size=n)),
        "lr_dtype": draw(st.sampled_from([None, None, torch.float32, torch.float64])),
        "momentum": draw(st.sampled_from([0.0, 0.9])),
        "n_params": draw(st.lists(st.integers(1, 2), min_size=n, max_size=n)),
        "a": a, "b": b, "steps": steps,
    }


def _stretch_onecycle(spec: Spec, total: int) -> None:
    if spec.cls == "OneCycleLR":
        spec.kwargs = {**spec.kwargs, "total_steps": total}
    for child in spec.children:
        _stretch_onecycle(child, total)


def _train(case: dict, spec: Spec, steps: int, lrs=None):
    opt = make_opt(case["opt_class"], lrs or case["lrs"], case["lr_dtype"], case["momentum"],
                   case["n_params"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = build(spec, opt)
        for _ in range(steps):
            step_once(opt, sched)
    return opt, sched


@settings(max_examples=int(os.environ.get("CKPTTOOL_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_resume_after_reschedule_is_the_run_with_the_new_schedule(tmp_path_factory, case):
    tmp = tmp_path_factory.mktemp("r")
    try:
        opt_a, sched_a = _train(case, case["a"], case["steps"])
    except (ZeroDivisionError, ValueError, OverflowError):
        event("torch refused schedule A")
        return  # torch refuses these arguments itself
    src, out = tmp / "a.pt", tmp / "b.pt"
    torch.save({"model": {"w": torch.arange(4.0)}, "optimizer": opt_a.state_dict(),
                "scheduler": sched_a.state_dict()}, src)
    # What B starts from: the stored initial lrs (schedule A's bases).
    bases = [g["initial_lr"] for g in opt_a.state_dict()["param_groups"]]
    bases = [b.item() if isinstance(b, torch.Tensor) else b for b in bases]
    keep_momentum = cycles(case["a"]) and not cycles(case["b"])
    try:
        scratch_opt, scratch = _train(case, case["b"], 0, lrs=bases)
    except (ZeroDivisionError, ValueError, OverflowError):
        event("torch refused schedule B")
        return
    event(f"{case['a'].cls} -> {case['b'].cls}")
    plan = ckpttool.reschedule(
        src, scheduler=spec_text(case["b"]),
        momentum=case["momentum"] if keep_momentum and case["opt_class"] == "SGD" else (
            0.9 if keep_momentum else None))
    plan.save(out)

    # The run that used B from step 0.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(case["steps"]):
            step_once(scratch_opt, scratch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = snapshots(scratch_opt, scratch, RESUMED_STEPS)

    # Resume from the rewritten file, the documented way.
    ckpt = torch.load(out, weights_only=True)
    opt = make_opt(case["opt_class"], case["lrs"], case["lr_dtype"], case["momentum"],
                   case["n_params"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = build(case["b"], opt)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        got = snapshots(opt, sched, RESUMED_STEPS)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert same(e, g), f"resumed step {i}: expected {e}, got {g}"

    # Per-parameter state and the model are untouched, bit for bit. (Re-read: load_state_dict
    # aliases same-dtype state tensors, which the resumed steps then update in place.)
    before, ckpt = torch.load(src, weights_only=True), torch.load(out, weights_only=True)
    for key, state in before["optimizer"]["state"].items():
        for name, value in state.items():
            assert same(value, ckpt["optimizer"]["state"][key][name])
    assert torch.equal(before["model"]["w"], ckpt["model"]["w"])


def test_rescheduling_to_the_stored_schedule_changes_nothing(tmp_path):
    src = FIXTURES / "adamw_cosine.pt"
    plan = ckpttool.reschedule(src)
    assert not plan.changed
    plan.save(tmp_path / "same.pt")
    a, b = read_checkpoint(src), read_checkpoint(tmp_path / "same.pt")
    assert a.root == b.root
    for key in a.storage_spans:
        assert a.read_storage(_ref(a, key)) == b.read_storage(_ref(b, key))


def _ref(file, key):
    from ckpttool.serialization import walk, TensorRef

    for _, value in walk(file.root):
        if isinstance(value, TensorRef) and value.storage and value.storage.key == key:
            return value.storage
    raise KeyError(key)


@pytest.mark.parametrize("fixture", ["tensor_lr.pt", "tensor_lr_f64.pt"])
def test_tensor_lrs_keep_dtype_and_device(tmp_path, fixture):
    out = tmp_path / "out.pt"
    ckpttool.reschedule(FIXTURES / fixture, sets=["T_max=50"]).save(out)
    before = torch.load(FIXTURES / fixture, weights_only=True)
    after = torch.load(out, weights_only=True)
    for g0, g1 in zip(before["optimizer"]["param_groups"], after["optimizer"]["param_groups"]):
        assert isinstance(g1["lr"], torch.Tensor) and g1["lr"].dtype == g0["lr"].dtype
        assert g1["lr"].device == g0["lr"].device and g1["initial_lr"].dtype == g0["lr"].dtype


def test_attach_a_scheduler_to_an_optimizer_without_one(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.01)
    for _ in range(5):
        opt.param_groups[0]["params"][0].grad = torch.ones(2)
        opt.step()
    src, out = tmp_path / "bare.pt", tmp_path / "sched.pt"
    torch.save({"optimizer": opt.state_dict()}, src)
    plan = ckpttool.reschedule(src, scheduler="CosineAnnealingLR(T_max=10)")
    assert plan.steps == 5 and plan.scheduler == "scheduler"
    plan.save(out)
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["scheduler"]["last_epoch"] == 5


def test_reduce_lr_on_plateau_is_changed_in_place(tmp_path):
    src = FIXTURES / "schedulers/ReduceLROnPlateau.pt"
    before = torch.load(src, weights_only=True)
    plan = ckpttool.reschedule(src, scale_lr=0.5, sets=["patience=7"])
    assert plan.semantics == "plateau-in-place" and plan.notes
    plan.save(tmp_path / "out.pt")
    after = torch.load(tmp_path / "out.pt", weights_only=True)
    for key in ("best", "num_bad_epochs", "cooldown_counter", "last_epoch"):
        assert after["scheduler"][key] == before["scheduler"][key]
    assert after["scheduler"]["patience"] == 7
    assert [g["lr"] for g in after["optimizer"]["param_groups"]] == [
        g["lr"] * 0.5 for g in before["optimizer"]["param_groups"]]


@pytest.mark.parametrize("kwargs, message", [
    ({"scheduler": "CosineLR(T_max=3)"}, "unknown scheduler class"),
    ({"scheduler": "CosineAnnealingLR(T_max=3, warmup=2)"}, "warmup"),
    ({"scheduler": "OneCycleLR(max_lr=0.1, total_steps=5)"}, "total"),
    ({"scheduler": "__import__('os').system('true')"}, "refused"),
    ({"lr": ["0.1"], "scale_lr": 0.5}, "scale"),
    ({"device": "cuda"}, "CUDA"),
    ({"optimizer": "nope"}, "no optimizer at"),
])
def test_refusals(kwargs, message):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(CkptToolError, match=message):
        ckpttool.reschedule(FIXTURES / "adamw_cosine.pt", **kwargs)


def test_lambda_not_stored_says_what_to_pass():
    with pytest.raises(CkptToolError, match="my_sched.py:make"):
        ckpttool.reschedule(FIXTURES / "schedulers/LambdaLR.pt", sets=[])


def test_lambda_from_a_factory(tmp_path):
    factory = tmp_path / "my_sched.py"
    factory.write_text("import torch\n"
                       "def make(optimizer):\n"
                       "    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.9 ** e)\n")
    plan = ckpttool.reschedule(FIXTURES / "schedulers/LambdaLR.pt",
                               scheduler=f"{factory}:make")
    plan.save(tmp_path / "out.pt")


def test_several_optimizers_need_a_choice():
    with pytest.raises(CkptToolError, match="--optimizer"):
        ckpttool.reschedule(FIXTURES / "layouts/gan.pt", scale_lr=0.5)
    plan = ckpttool.reschedule(FIXTURES / "layouts/gan.pt", optimizer="opt_d", scale_lr=0.5)
    assert plan.scheduler == "sched_d"


def test_output_exists_needs_force_and_input_is_untouched(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes((FIXTURES / "adamw_cosine.pt").read_bytes())
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    plan = ckpttool.reschedule(src, sets=["T_max=80"])
    with pytest.raises(CkptToolError, match="exists; pass force=True to overwrite it, or choose another path"):
        plan.save(out)
    assert out.read_bytes() == b"keep me"
    plan.save(out, force=True)
    assert src.read_bytes() == (FIXTURES / "adamw_cosine.pt").read_bytes()


@pytest.mark.parametrize("where", ["-o", "--out-dir"])
def test_an_existing_output_is_refused_naming_the_option_used(tmp_path, run_cli, where):
    """The message says what to change: the option the user gave, -o or --out-dir."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "adamw_cosine.pt").write_bytes(b"keep me")
    target = out_dir / "adamw_cosine.pt" if where == "-o" else out_dir
    result = run_cli("reschedule", FIXTURES / "adamw_cosine.pt", where, target, "--set",
                     "T_max=80")
    assert result.exit_code == EXIT_ERROR
    assert result.stderr.strip().endswith(
        f"adamw_cosine.pt exists; pass --force to overwrite it, or choose another {where}")
    assert (out_dir / "adamw_cosine.pt").read_bytes() == b"keep me"
    assert os.listdir(out_dir) == ["adamw_cosine.pt"]


def test_in_place_keeps_a_backup(tmp_path):
    src = tmp_path / "in.pt"
    original = (FIXTURES / "adamw_cosine.pt").read_bytes()
    src.write_bytes(original)
    ckpttool.reschedule(src, sets=["T_max=80"]).save_in_place()
    assert (tmp_path / "in.pt.bak").read_bytes() == original
    assert torch.load(src, weights_only=True)["scheduler"]["T_max"] == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt", "in.pt.bak"]


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-hard-links"])
@pytest.mark.parametrize("force", [False, True], ids=["new-backup", "over-a-backup"])
def test_in_place_never_leaves_the_source_name_empty(tmp_path, monkeypatch, links, force):
    """The backup is made as a second name of the source, and the new file then takes the
    source's name in one rename; where hard links fail, the old order (rename to the backup,
    then the new file in) is kept."""
    src, bak = tmp_path / "in.pt", tmp_path / "in.pt.bak"
    original = (FIXTURES / "adamw_cosine.pt").read_bytes()
    src.write_bytes(original)
    if force:
        bak.write_bytes(b"an older backup")
    gaps = []
    real_replace, real_link = os.replace, os.link

    def replace(a, b, *args, **kwargs):
        real_replace(a, b, *args, **kwargs)
        gaps.append(not os.path.exists(src))

    def link(a, b, *args, **kwargs):
        if not links:
            raise OSError(1, "Operation not permitted")
        return real_link(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    result = ckpttool.reschedule(src, sets=["T_max=80"]).save_in_place(force=force)
    assert gaps and any(gaps) is not links  # with a hard link, never a moment without in.pt
    assert bak.read_bytes() == original and result.backup == str(bak)
    assert torch.load(src, weights_only=True)["scheduler"]["T_max"] == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt", "in.pt.bak"]


def test_two_states_at_one_location_are_refused(tmp_path):
    """A key holding a '/' ({"a/b": ..., "a": {"b": ...}}) puts two states at "a/b"."""
    ckpt = torch.load(FIXTURES / "adamw_cosine.pt", weights_only=True)
    twin = copy.deepcopy(ckpt["optimizer"])
    twin["param_groups"][0]["lr"] = 0.5
    torch.save({"a/b": ckpt["optimizer"], "a": {"b": twin}, "sched": ckpt["scheduler"]},
               tmp_path / "two.pt")
    with pytest.raises(CkptToolError, match="two states are at 'a/b'"):
        ckpttool.reschedule(tmp_path / "two.pt", optimizer="a/b", sets=["T_max=80"])


def test_a_hard_link_to_the_input_is_the_input(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes((FIXTURES / "adamw_cosine.pt").read_bytes())
    os.link(src, tmp_path / "link.pt")
    plan = ckpttool.reschedule(src, sets=["T_max=80"])
    with pytest.raises(CkptToolError, match="the output is the input; use --in-place"):
        plan.save(tmp_path / "link.pt", force=True)
    assert (tmp_path / "link.pt").read_bytes() == (FIXTURES / "adamw_cosine.pt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt", "link.pt"]


def test_a_rewritten_file_keeps_the_mode_cp_would_give_it(tmp_path):
    """A new output: the input's mode less the umask; over an existing file (--force): that
    file's mode; in place: the input's own mode, backup included."""
    umask = os.umask(0o022)
    os.umask(umask)
    src = tmp_path / "in.pt"
    src.write_bytes((FIXTURES / "adamw_cosine.pt").read_bytes())
    os.chmod(src, 0o640)
    plan = ckpttool.reschedule(src, sets=["T_max=80"])
    plan.save(tmp_path / "new.pt")
    (tmp_path / "old.pt").write_bytes(b"an earlier output")
    os.chmod(tmp_path / "old.pt", 0o604)
    plan.save(tmp_path / "old.pt", force=True)
    plan.save_in_place()

    def mode(name):
        return oct(os.stat(tmp_path / name).st_mode & 0o777)

    assert [mode(n) for n in ("new.pt", "old.pt", "in.pt", "in.pt.bak")] == [
        oct(0o640 & ~umask), oct(0o604), oct(0o640), oct(0o640)]


def test_a_folder_sync_failing_after_the_rename_is_a_warning(tmp_path, run_cli, monkeypatch):
    """The output has its name and is verified: exit 0, and one line saying what to do."""
    out = tmp_path / "o.pt"
    real_fsync = os.fsync

    def fsync(fd):
        if out.exists() and os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    result = run_cli("reschedule", FIXTURES / "adamw_cosine.pt", "-o", out, "--set", "T_max=80")
    assert result.exit_code == EXIT_OK, result.stderr
    assert result.stderr == (f"ckpttool: warning: {out} is written and verified, but "
                             f"{tmp_path} could not be synced to disk (Input/output error): "
                             "run `sync` before relying on it after a power loss\n")
    assert torch.load(out, weights_only=True)["scheduler"]["T_max"] == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.pt"]


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_reschedule_writes_verifies_and_says_what_to_do(run_cli, tmp_path):
    out = tmp_path / "out.pt"
    result = run_cli("reschedule", FIXTURES / "adamw_cosine.pt", "-o", out, "--set", "T_max=80")
    assert result.exit_code == EXIT_OK, result.stderr
    assert "verified" in result.stdout and "T_max=80" in result.stdout
    assert "CosineAnnealingLR(optimizer, T_max=80" in result.stdout


def test_cli_dry_run_writes_nothing(run_cli, tmp_path):
    result = run_cli("reschedule", FIXTURES / "adamw_cosine.pt", "--dry-run", "--lr", "0.0005")
    assert result.exit_code == EXIT_OK and "dry run" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_cli_json_schema(run_cli, tmp_path):
    result = run_cli("reschedule", FIXTURES / "adamw_cosine.pt", "-o", tmp_path / "o.pt",
                     "--lr", "1=0.002", "--json")
    doc = json.loads(result.stdout)
    assert doc["schema"] == "ckpttool.reschedule/1"
    assert set(doc) >= {"path", "output", "optimizer", "scheduler", "semantics", "step", "old",
                        "new", "groups", "notes", "verified_steps"}
    assert doc["groups"][1]["changes"]["initial_lr"] == {"old": 0.001, "new": 0.002}
    assert doc["groups"][0]["changes"] == {}


@pytest.mark.parametrize("args, message", [
    (["reschedule", "fixtures/adamw_cosine.pt"], "exactly one of"),
    (["reschedule", "fixtures/adamw_cosine.pt", "-o", "x.pt", "--in-place"], "exactly one of"),
    (["reschedule", "fixtures/bad/truncated.pt", "--dry-run"], "truncated"),
    (["reschedule", "fixtures/schedulers/LambdaLR.pt", "--dry-run"], "my_sched.py:make"),
])
def test_cli_refusals_are_one_line(run_cli, monkeypatch, args, message):
    monkeypatch.chdir(ROOT)
    result = run_cli(*args)
    assert result.exit_code == EXIT_ERROR
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr


@pytest.mark.parametrize("spec", [
    "CosineAnnealingLR(T_max=30, eta_min=1e-05)",
    "SequentialLR(schedulers=[MultiStepLR(milestones=[2, 3]), CosineAnnealingLR(T_max=30)], "
    "milestones=[5])",
    "ChainedScheduler(schedulers=[ConstantLR(factor=0.5, total_iters=3), ExponentialLR(gamma=0.9)])",
])
def test_printed_constructor_line_builds_the_new_schedule(run_cli, spec):
    result = run_cli("reschedule", FIXTURES / "adamw_cosine.pt", "--dry-run", "--scheduler", spec)
    line = next(l for l in result.stdout.splitlines() if l.strip().startswith("scheduler = "))
    optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(1))]},
                                   {"params": [torch.nn.Parameter(torch.ones(1))]}], lr=0.001)
    namespace = {"lr_scheduler": L, "optimizer": optimizer}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(line.strip(), namespace)
    assert type(namespace["scheduler"]).__name__ == spec.split("(")[0]


def test_switching_from_and_to_reduce_lr_on_plateau(tmp_path):
    src = FIXTURES / "schedulers/ReduceLROnPlateau.pt"
    plan = ckpttool.reschedule(src, scheduler="CosineAnnealingLR(T_max=40)")
    assert plan.semantics == "replay" and plan.steps == torch.load(
        src, weights_only=True)["scheduler"]["last_epoch"]
    plan.save(tmp_path / "cos.pt")
    plan = ckpttool.reschedule(FIXTURES / "adamw_cosine.pt",
                               scheduler="ReduceLROnPlateau(patience=3)")
    assert any("ReduceLROnPlateau cannot be replayed" in n for n in plan.notes)
    plan.save(tmp_path / "rop.pt")
    state = torch.load(tmp_path / "rop.pt", weights_only=True)["scheduler"]
    assert state["patience"] == 3 and state["last_epoch"] == 16


def _cuda_lr_checkpoint(tmp_path):
    """tensor_lr.pt with its lr tensors recorded as saved from cuda:0 (made on a CPU machine)."""
    from ckpttool.serialization import NewTensor, TensorRef, write_checkpoint

    file = read_checkpoint(FIXTURES / "tensor_lr.pt")
    root = copy.copy(file.root)
    opt = dict(root["optimizer"])
    groups = []
    for g in opt["param_groups"]:
        g = dict(g)
        for key in ("lr", "initial_lr"):
            ref = g[key]
            assert isinstance(ref, TensorRef)
            g[key] = NewTensor(ref.dtype, ref.shape, file.tensor_bytes(ref), "cuda:0")
        groups.append(g)
    opt["param_groups"] = groups
    root["optimizer"] = opt
    path = tmp_path / "cuda_lr.pt"
    write_checkpoint(file, root, path)
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU fallback")
def test_cuda_lrs_without_a_gpu_are_restepped_on_cpu_and_written_back_to_cuda(tmp_path):
    src = _cuda_lr_checkpoint(tmp_path)
    plan = ckpttool.reschedule(src, sets=["T_max=50"])
    assert any("no CUDA device" in n for n in plan.notes)
    plan.save(tmp_path / "out.pt")
    out = read_checkpoint(tmp_path / "out.pt")
    lr = out.root["optimizer"]["param_groups"][0]["lr"]
    assert lr.device == "cuda:0" and lr.dtype == "float32"
    loaded = torch.load(tmp_path / "out.pt", weights_only=True, map_location="cpu")
    assert loaded["optimizer"]["param_groups"][0]["lr"].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensor_lrs_are_restepped_on_the_gpu(tmp_path):
    params = [torch.nn.Parameter(torch.ones(2, device="cuda"))]
    opt = torch.optim.Adam(params, lr=torch.tensor(0.01, device="cuda"), foreach=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    for _ in range(7):
        params[0].grad = torch.ones_like(params[0])
        opt.step()
        sched.step()
    src, out = tmp_path / "gpu.pt", tmp_path / "out.pt"
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, src)
    ckpttool.reschedule(src, sets=["T_max=40"], device="cuda").save(out)
    # The oracle: the same run with T_max=40 from step 0, on the GPU.
    p2 = [torch.nn.Parameter(torch.ones(2, device="cuda"))]
    o2 = torch.optim.Adam(p2, lr=torch.tensor(0.01, device="cuda"), foreach=False)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(o2, T_max=40)
    for _ in range(7):
        o2.step()
        s2.step()
    written = torch.load(out, weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    assert written.device.type == "cuda"
    assert torch.equal(written.view(torch.int32), o2.param_groups[0]["lr"].view(torch.int32))


# --- what the rewrite touches, and what it never touches ----------------------------------------

OWNED = {"lr", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "momentum",
         "betas"}


@pytest.mark.parametrize("fixture", ["adamw_cosine.pt", "opaque.pt", "legacy.pt",
                                     "layouts/lightning.ckpt", "layouts/gan.pt"])
def test_everything_outside_the_groups_and_scheduler_is_unchanged(tmp_path, fixture):
    from ckpttool.serialization import TensorRef, walk

    src = FIXTURES / fixture
    opt = "opt_g" if fixture == "layouts/gan.pt" else None
    plan = ckpttool.reschedule(src, scale_lr=0.5, optimizer=opt)
    plan.save(tmp_path / "out")
    a, b = read_checkpoint(src), read_checkpoint(tmp_path / "out")

    def outside(file):
        """Every (path, value) leaf except those under the rewritten groups' owned keys and
        the scheduler state."""
        out = {}
        for path, value in walk(file.root):
            if path[:len(plan.scheduler_path)] == plan.scheduler_path:
                continue
            p = plan.optimizer_path + ("param_groups",)
            if path[:len(p)] == p and len(path) > len(p) + 1 and path[len(p) + 1] in OWNED:
                continue
            if isinstance(value, (dict, list, tuple)):
                continue
            out[path] = value
        return out

    before, after = outside(a), outside(b)
    assert before.keys() == after.keys()
    for path, value in before.items():
        other = after[path]
        if isinstance(value, TensorRef):  # same metadata and the very same bytes
            assert (value.dtype, value.shape, value.stride) == (other.dtype, other.shape,
                                                                other.stride)
            assert a.tensor_bytes(value) == b.tensor_bytes(other), path
        else:
            assert value == other, path


def test_in_place_without_backup(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes((FIXTURES / "adamw_cosine.pt").read_bytes())
    ckpttool.reschedule(src, sets=["T_max=80"]).save_in_place(backup=False)
    assert [p.name for p in tmp_path.iterdir()] == ["in.pt"]


def test_a_failed_verification_removes_the_output(tmp_path, monkeypatch):
    from ckpttool import schedule

    monkeypatch.setattr(schedule, "verify_resume", lambda plan, file, steps: "resumed step 1: "
                        "stored 0.1 != replayed 0.2")
    plan = ckpttool.reschedule(FIXTURES / "adamw_cosine.pt", sets=["T_max=80"])
    with pytest.raises(CkptToolError, match="does not resume as replayed"):
        plan.save(tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


def test_long_replays_report_progress():
    seen = []
    plan = ckpttool.reschedule(FIXTURES / "adamw_cosine.pt", step=100_000,
                               progress=lambda done, total: seen.append((done, total)))
    assert plan.steps == 100_000
    assert seen and seen[-1] == (100_000, 100_000)


@pytest.mark.parametrize("change", [["T_max=80"], ["T_max=20000"], ["eta_min=0.5"]])
def test_meta_loading_computes_true_offsets_in_the_output(tmp_path, change):
    """torch.load(map_location="meta") derives every storage's file offset from torch.save's own
    sequential layout (torch/serialization.py `_get_offset`); a rewritten file must keep that
    layout exactly, whatever the new pickle's length, or those offsets silently point elsewhere."""
    out = tmp_path / "out.pt"
    ckpttool.reschedule(FIXTURES / "adamw_cosine.pt", sets=change).save(out)
    assert _meta_offsets_are_true(out) > 4


def test_an_ambiguous_pairing_is_refused_not_guessed(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    for _ in range(3):
        opt.step()
        sched.step()
    path = tmp_path / "twins.pt"
    torch.save({"first": opt.state_dict(), "second": opt.state_dict(), "lr_sched": sched.state_dict()},
               path)
    assert ckpttool.load(path).schedulers[0].optimizer is None
    with pytest.raises(CkptToolError, match="will not guess"):
        ckpttool.reschedule(path, optimizer="first", scale_lr=0.5)


def _meta_offsets_are_true(path) -> int:
    from ckpttool.serialization import TensorRef

    meta = torch.load(path, weights_only=True, map_location="meta")
    file = read_checkpoint(path)
    checked = 0

    def visit(a, b):
        nonlocal checked
        if isinstance(b, TensorRef):
            assert a.untyped_storage()._checkpoint_offset == file.storage_spans[b.storage.key][0]
            checked += 1
        elif isinstance(b, dict):
            for k in b:
                visit(a[k], b[k])
        elif isinstance(b, (list, tuple)):
            for x, y in zip(a, b):
                visit(x, y)

    visit(meta, file.root)
    return checked


@pytest.mark.parametrize("fixture, args", [
    ("adamw_cosine.pt", ["--set", "T_max=20000"]),
    ("tensor_lr.pt", ["--set", "T_max=50"]),
    ("layouts/lightning.ckpt", ["--scale-lr", "0.5"]),
    ("schedulers/OneCycleLR.pt", ["--set", "total_steps=60"]),
])
def test_cli_writes_in_stages_and_the_layout_stays_torchs(run_cli, tmp_path, fixture, args):
    out = tmp_path / "out.pt"
    result = run_cli("reschedule", FIXTURES / fixture, "-o", out, *args)
    assert result.exit_code == EXIT_OK, result.stderr
    assert _meta_offsets_are_true(out) > 0
    # Same content as the one-stage writer gives.
    plan_out = tmp_path / "plain.pt"
    plan = ckpttool.reschedule(FIXTURES / fixture, sets=[a for a in args[1::2] if "=" in a]
                               if args[0] == "--set" else (),
                               scale_lr=float(args[1]) if args[0] == "--scale-lr" else None)
    plan.save(plan_out)
    a, b = torch.load(out, weights_only=True), torch.load(plan_out, weights_only=True)
    assert same(_plainly(a), _plainly(b))


def _plainly(tree):
    if isinstance(tree, dict):
        return {k: _plainly(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plainly(v) for v in tree]
    return tree


def test_a_failure_after_staging_leaves_nothing_behind(run_cli, tmp_path):
    out = tmp_path / "out.pt"
    result = run_cli("reschedule", FIXTURES / "adamw_cosine.pt", "-o", out,
                     "--scheduler", "OneCycleLR(max_lr=0.1, total_steps=5)")
    assert result.exit_code == EXIT_ERROR and "total_steps" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_schedule_that_ends_soon_says_so_and_verifies_only_what_it_can(tmp_path):
    plan = ckpttool.reschedule(FIXTURES / "adamw_cosine.pt",
                               scheduler="OneCycleLR(max_lr=0.01, total_steps=20)")
    assert any("ends 4 steps after the resume point" in n for n in plan.notes)
    assert plan.save(tmp_path / "out.pt").verified_steps == 4
    with pytest.raises(CkptToolError, match="raises at its first step"):
        ckpttool.reschedule(FIXTURES / "adamw_cosine.pt",
                            scheduler="OneCycleLR(max_lr=0.01, total_steps=16)")


def test_notes_for_what_the_table_does_not_show():
    plan = ckpttool.reschedule(FIXTURES / "adamw_cosine.pt", step=10, momentum=0.9)
    assert any("--momentum was not applied" in n for n in plan.notes)
    assert any("resume your training loop's counter at 10" in n for n in plan.notes)
    jump = ckpttool.reschedule(FIXTURES / "adamw_cosine.pt", lr=["0.01"])
    assert any("jumps from" in n for n in jump.notes)


def test_output_equal_to_input_points_to_in_place(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes((FIXTURES / "adamw_cosine.pt").read_bytes())
    plan = ckpttool.reschedule(src, sets=["T_max=80"])
    for force in (False, True):
        with pytest.raises(CkptToolError, match="--in-place"):
            plan.save(src, force=force)


def test_cli_in_place_reports_the_backup(run_cli, tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes((FIXTURES / "adamw_cosine.pt").read_bytes())
    result = run_cli("reschedule", src, "--in-place", "--set", "T_max=80", "--json")
    assert result.exit_code == EXIT_OK, result.stderr
    assert json.loads(result.stdout)["backup"] == f"{src}.bak"


def _failing_verification(monkeypatch):
    from ckpttool import schedule

    monkeypatch.setattr(schedule, "verify_resume",
                        lambda plan, file, steps: "resumed step 1: stored 0.1 != replayed 0.2")


def test_a_failed_verification_leaves_a_forced_target_untouched(tmp_path, monkeypatch):
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    _failing_verification(monkeypatch)
    plan = ckpttool.reschedule(FIXTURES / "adamw_cosine.pt", sets=["T_max=80"])
    with pytest.raises(CkptToolError, match="does not resume as replayed"):
        plan.save(out, force=True)
    assert out.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_a_failed_in_place_rewrite_leaves_the_source_untouched(run_cli, tmp_path, monkeypatch):
    src = tmp_path / "in.pt"
    original = (FIXTURES / "adamw_cosine.pt").read_bytes()
    src.write_bytes(original)
    _failing_verification(monkeypatch)
    result = run_cli("reschedule", src, "--in-place", "--set", "T_max=80")
    assert result.exit_code == EXIT_ERROR
    assert src.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["in.pt"]


def test_in_place_through_a_symlink_rewrites_its_target(run_cli, tmp_path):
    real, link = tmp_path / "real.pt", tmp_path / "link.pt"
    real.write_bytes((FIXTURES / "adamw_cosine.pt").read_bytes())
    link.symlink_to(real)
    result = run_cli("reschedule", link, "--in-place", "--set", "T_max=80")
    assert result.exit_code == EXIT_OK, result.stderr
    assert link.is_symlink() and torch.load(link, weights_only=True)["scheduler"]["T_max"] == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pt", "real.pt", "real.pt.bak"]


def test_os_errors_are_one_line(run_cli, tmp_path, monkeypatch):
    import errno

    from ckpttool import serialization

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization.os, "copy_file_range", full, raising=False)
    monkeypatch.setattr(serialization.os, "sendfile", full, raising=False)
    monkeypatch.setattr(serialization.os, "pwrite", full)  # direct writes
    monkeypatch.setattr(serialization, "_write_all", full)
    result = run_cli("reschedule", FIXTURES / "adamw_cosine.pt", "-o", tmp_path / "o.pt",
                     "--set", "T_max=80")
    assert result.exit_code == EXIT_ERROR
    assert len(result.stderr.splitlines()) == 1 and "No space left" in result.stderr
    assert "internal error" not in result.stderr and list(tmp_path.iterdir()) == []


def test_the_output_is_on_disk_and_verified_before_it_takes_its_name(run_cli, tmp_path,
                                                                    monkeypatch):
    events = record_durability(monkeypatch)
    real_verify = ckpttool.Rescheduled.verify

    def verify(self, path, *args):
        events.append(f"verify {os.path.basename(path)}")
        return real_verify(self, path, *args)

    monkeypatch.setattr(ckpttool.Rescheduled, "verify", verify)
    result = run_cli("reschedule", FIXTURES / "adamw_cosine.pt", "-o", tmp_path / "o.pt",
                     "--set", "T_max=80")
    assert result.exit_code == EXIT_OK, result.stderr
    assert events == ["fsync file", "rename to .o.pt.ckpttool-new", "fsync folder",
                      "verify .o.pt.ckpttool-new", "rename to o.pt", "fsync folder"]


def test_leaving_a_cycling_schedule_says_where_the_base_lr_comes_from():
    plan = ckpttool.reschedule(FIXTURES / "schedulers/OneCycleLR.pt",
                               scheduler="CosineAnnealingLR(T_max=40)", momentum=0.9)
    assert any("pass --lr to choose the base lr" in n for n in plan.notes)


HF_SCHEDULES = [
    ("linear", dict(num_warmup_steps=3, num_training_steps=30)),
    ("cosine", dict(num_warmup_steps=2, num_training_steps=40, num_cycles=0.5)),
    ("cosine_with_restarts", dict(num_warmup_steps=2, num_training_steps=40, num_cycles=2)),
    ("polynomial", dict(num_warmup_steps=4, num_training_steps=30, power=2.0, lr_end=1e-5)),
    ("constant_with_warmup", dict(num_warmup_steps=5)),
    ("inverse_sqrt", dict(num_warmup_steps=4)),
]


@pytest.mark.parametrize("name, args", HF_SCHEDULES, ids=[n for n, _ in HF_SCHEDULES])
def test_hf_schedules_resume_as_a_run_that_used_them(tmp_path, name, args):
    """hf:NAME(...) is built by transformers' get_scheduler; the oracle is transformers too."""
    transformers = pytest.importorskip("transformers")
    steps, groups = 12, [0.01, 0.002]

    def build(opt):
        main = {k: args[k] for k in ("num_warmup_steps", "num_training_steps") if k in args}
        extra = {k: v for k, v in args.items() if k not in main}
        return transformers.get_scheduler(name, opt, **main,
                                          scheduler_specific_kwargs=extra or None)

    # A checkpoint of an AdamW run with a StepLR, at step 12.
    opt = make_opt("AdamW", groups, None, 0.9, [2, 1])
    sched = L.StepLR(opt, step_size=5, gamma=0.5)
    for _ in range(steps):
        step_once(opt, sched)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "a.pt")
    spec = f"hf:{name}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"
    ckpttool.reschedule(tmp_path / "a.pt", scheduler=spec).save(tmp_path / "b.pt")
    # The run that used the HF schedule from step 0 ...
    ref_opt = make_opt("AdamW", groups, None, 0.9, [2, 1])
    ref = build(ref_opt)
    for _ in range(steps):
        step_once(ref_opt, ref)
    expected = snapshots(ref_opt, ref, RESUMED_STEPS)  # the lr the first resumed step uses, ...
    # ... and the resumed one, loaded the documented way.
    ckpt = torch.load(tmp_path / "b.pt", weights_only=True)
    new_opt = make_opt("AdamW", groups, None, 0.9, [2, 1])
    new_sched = build(new_opt)
    new_opt.load_state_dict(ckpt["optimizer"])
    new_sched.load_state_dict(ckpt["scheduler"])
    got = snapshots(new_opt, new_sched, RESUMED_STEPS)
    assert same(got, expected)


def test_hf_spec_set_and_missing_transformers(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    plan = ckpttool.reschedule(FIXTURES / "adamw_cosine.pt",
                               scheduler="hf:linear(num_warmup_steps=5, num_training_steps=40)",
                               sets=["num_training_steps=80"])
    assert "hf:linear(num_warmup_steps=5, num_training_steps=80)" in plan.new_call
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(CkptToolError, match=r"pip install 'ckpttool\[hf\]'"):
        ckpttool.reschedule(FIXTURES / "adamw_cosine.pt", scheduler="hf:linear(num_warmup_steps=5, "
                            "num_training_steps=40)")


def test_an_unknown_hf_argument_lists_the_valid_ones():
    pytest.importorskip("transformers")
    with pytest.raises(CkptToolError, match=r"hf:linear has no argument 'num_training_step'; "
                       r"did you mean num_training_steps\?; valid: num_warmup_steps, "
                       r"num_training_steps$"):
        ckpttool.reschedule(ROOT / "fixtures/dirs/hf_trainer/checkpoint-20",
                            sets=["num_training_step=80"])
    with pytest.raises(CkptToolError, match=r"hf:cosine has no argument 'T_max'; valid: "
                       r"num_warmup_steps, num_training_steps, num_cycles"):
        ckpttool.reschedule(FIXTURES / "adamw_cosine.pt",
                            scheduler="hf:cosine(num_warmup_steps=2, num_training_steps=40, "
                            "T_max=3)")


@pytest.mark.parametrize("source, out", [
    (FIXTURES / "adamw_cosine.pt", "nope/x.pt"),
    (ROOT / "fixtures/dirs/hf_trainer/checkpoint-20", "nope/checkpoint-20")])
def test_an_output_in_a_missing_folder_says_to_create_it(run_cli, tmp_path, source, out):
    result = run_cli("reschedule", source, "-o", tmp_path / out, "--step", "3")
    assert result.exit_code == EXIT_ERROR
    assert result.stderr.strip().endswith(
        f"{tmp_path / 'nope'}: no such folder for the output {tmp_path / out}; create it "
        "first (--out-dir creates the folders it needs)")
    assert list(tmp_path.iterdir()) == []
