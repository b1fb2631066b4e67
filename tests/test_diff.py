"""ckpttool diff: what it reports is what differs, checked against an oracle that loads both
files with torch and walks the real objects.

The oracle (``oracle_changes``) is a plain recursive comparison of ``torch.load`` results: keys
one side lacks, values that differ, tensors of another dtype or shape or with other elements.
ckpttool never loads tensors into torch to compare them unless their bytes differ, so the two
agree only if ckpttool's byte comparison, deepdiff tree walk and chunked statistics are right.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpttool
from ckpttool import diffing as diff_module
from ckpttool import serialization
from ckpttool.diffing import SECTIONS, diff
from ckpttool.errors import EXIT_DIFFERENT, EXIT_ERROR, EXIT_OK, InputError
from conftest import FIXTURES, ROOT

COSINE = FIXTURES / "adamw_cosine.pt"


# --- the oracle --------------------------------------------------------------------------------


def _same_scalar(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, float) and math.isnan(x) and math.isnan(y):
        return True
    return x == y


def oracle_changes(x: Any, y: Any, path: tuple = ()) -> dict[str, str]:
    """path -> kind, for two trees torch.load returned."""
    where = "/".join(str(p) for p in path)
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        if x.dtype != y.dtype:
            return {where: "dtype"}
        if x.shape != y.shape:
            return {where: "shape"}
        same = (x == y) | (x.isnan() & y.isnan()) if x.is_floating_point() else x == y
        return {} if bool(same.all()) else {where: "tensor"}
    if isinstance(x, dict) and isinstance(y, dict):
        out: dict[str, str] = {}
        for k in x:
            if k not in y:
                out["/".join(str(p) for p in path + (k,))] = "removed"
            else:
                out.update(oracle_changes(x[k], y[k], path + (k,)))
        for k in y:
            if k not in x:
                out["/".join(str(p) for p in path + (k,))] = "added"
        return out
    if isinstance(x, (list, tuple)) and type(x) is type(y):
        out = {}
        for i in range(max(len(x), len(y))):
            sub = "/".join(str(p) for p in path + (i,))
            if i >= len(y):
                out[sub] = "removed"
            elif i >= len(x):
                out[sub] = "added"
            else:
                out.update(oracle_changes(x[i], y[i], path + (i,)))
        return out
    if type(x) is not type(y):
        return {where: "type"}
    return {} if _same_scalar(x, y) else {where: "value"}


def load(path: Path) -> Any:
    return torch.load(path, weights_only=False)


def reported(d: ckpttool.Diff) -> dict[str, str]:
    return {c.path: c.kind for c in d.changes}


def save(tmp_path: Path, name: str, obj: Any, **kwargs) -> Path:
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path


# --- against a reschedule output ---------------------------------------------------------------

RESCHEDULES = [
    ("adamw_cosine.pt", dict(sets=["T_max=80"])),
    ("adamw_cosine.pt", dict(lr=["0.002"])),
    ("adamw_cosine.pt", dict(scheduler="OneCycleLR(max_lr=0.01, total_steps=60)")),
    ("tensor_lr.pt", dict(scale_lr=0.5)),
    ("schedulers/OneCycleLR.pt", dict(scheduler="CosineAnnealingLR(T_max=50)", momentum=0.9)),
    ("schedulers/SequentialLR.pt", dict(sets=["milestones=[3]"])),
    ("layouts/lightning.ckpt", dict(scale_lr=2.0)),
    ("legacy.pt", dict(sets=["eta_min=0.0"])),
]


@pytest.mark.parametrize("name, change", RESCHEDULES, ids=[f"{n}-{c}" for n, c in RESCHEDULES])
def test_a_reschedule_output_differs_in_the_rewritten_fields_only(tmp_path, name, change):
    source = FIXTURES / name
    out = tmp_path / "out.pt"
    ckpttool.reschedule(source, **change).save(out)
    d = diff(source, out)
    assert reported(d) == oracle_changes(load(source), load(out))
    assert not d.equal
    # Only the states reschedule owns changed, and no tensor but a tensor lr.
    assert {c.section for c in d.changes} <= {"optimizer", "scheduler"}
    for c in d.changes:
        if c.kind == "tensor":
            assert c.path.split("/")[-1] in ("lr", "initial_lr") or "_last_lr" in c.path \
                or "base_lrs" in c.path, c.path
    assert all("/state/" not in c.path for c in d.changes)
    assert d.tensors.changed == sum(1 for c in d.changes if c.kind == "tensor")


def test_a_file_against_itself_is_equal(run_cli):
    for path in (COSINE, FIXTURES / "layouts/lightning.ckpt", FIXTURES / "opaque.pt"):
        d = diff(path, path)
        assert d.equal and d.changes == () and d.optimizers == () and d.schedulers == ()
        assert d.summary.startswith("no differences")
        result = run_cli("diff", path, path)
        assert result.exit_code == EXIT_OK
        assert "no differences" in result.stdout


def test_zip_and_legacy_of_one_tree_are_equal():
    d = diff(COSINE, FIXTURES / "legacy.pt")
    assert d.equal and (d.kind_a, d.kind_b) == ("torch-zip", "torch-legacy")


FIXTURE_PAIRS = [
    ("adamw_cosine.pt", "findings/lr_mismatch.pt"),
    ("adamw_cosine.pt", "findings/missing_initial_lr.pt"),
    ("adamw_cosine.pt", "findings/group_count_mismatch.pt"),
    ("adamw_cosine.pt", "tensor_lr.pt"),
    ("schedulers/SequentialLR.pt", "schedulers/OneCycleLR.pt"),
    ("schedulers/StepLR.pt", "schedulers/MultiStepLR.pt"),
    ("optimizers/Adam.pt", "optimizers/AdamW.pt"),
    ("layouts/gan.pt", "layouts/two_optimizers.pt"),
    ("layouts/tutorial.pt", "layouts/nested.pt"),
    ("tensor_lr.pt", "tensor_lr_f64.pt"),
]


@pytest.mark.parametrize("a, b", FIXTURE_PAIRS)
def test_changes_are_what_the_oracle_finds(a, b):
    ta, tb = load(FIXTURES / a), load(FIXTURES / b)
    d = diff(FIXTURES / a, FIXTURES / b)
    assert reported(d) == oracle_changes(ta, tb)
    # Tensor statistics are those of the real tensors.
    for c in d.changes:
        if c.kind == "tensor":
            x, y = _at(ta, c.path), _at(tb, c.path)
            assert c.n_diff == int((x != y).sum())
            assert c.numel == x.numel()
            xw, yw = x.double(), y.double()
            assert c.max_abs == float((xw - yw).abs().max())
    assert d.equal == (not d.changes)


def _at(tree: Any, path: str) -> Any:
    for key in path.split("/"):
        if isinstance(tree, (list, tuple)):
            tree = tree[int(key)]
        else:
            tree = tree[int(key)] if int_key(tree, key) else tree[key]
    return tree


def int_key(tree: dict, key: str) -> bool:
    return key.isdigit() and int(key) in tree


# --- tensors -----------------------------------------------------------------------------------


def test_one_changed_element_is_found_with_its_statistics(tmp_path):
    g = torch.Generator().manual_seed(0)
    tree = {"model": {"w": torch.randn(700, 300, generator=g), "b": torch.randn(300, generator=g)},
            "step": 3}
    a = save(tmp_path, "a.pt", tree)
    tree["model"]["w"][123, 45] += 0.5
    b = save(tmp_path, "b.pt", tree)
    old = torch.load(a)["model"]["w"][123, 45].item()
    new = tree["model"]["w"][123, 45].item()
    d = diff(a, b)
    (c,) = d.changes
    assert (c.path, c.kind, c.section, c.n_diff, c.numel) == ("model/w", "tensor", "tensors",
                                                              1, 700 * 300)
    assert c.max_abs == abs(old - new)
    assert c.max_rel == abs(old - new) / abs(new)
    assert (d.tensors.compared, d.tensors.changed) == (2, 1)
    assert d.summary == "1 of 2 tensors changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int64, torch.int8, torch.uint8, torch.bool,
                                   torch.complex64, torch.float8_e4m3fn])
def test_every_dtype_is_compared(tmp_path, dtype):
    base = torch.arange(24).reshape(4, 6) % 5
    x = base.to(dtype) if dtype != torch.float8_e4m3fn else base.float().to(dtype)
    y = x.clone()
    y.view(-1)[7] = (torch.tensor(1).to(dtype) if dtype != torch.float8_e4m3fn
                     else torch.tensor(1.0).to(dtype)) if x.view(-1)[7].item() != 1 else 0
    a, b = save(tmp_path, "a.pt", {"t": x}), save(tmp_path, "b.pt", {"t": y})
    (c,) = diff(a, b).changes
    assert (c.kind, c.n_diff, c.numel) == ("tensor", 1, 24)
    assert diff(a, a).equal


def test_nan_equals_nan_and_signed_zeros_are_equal(tmp_path):
    x = torch.tensor([math.nan, 0.0, 1.0, math.inf])
    y = torch.tensor([math.nan, -0.0, 1.0, math.inf])
    assert diff(save(tmp_path, "a.pt", {"t": x}), save(tmp_path, "b.pt", {"t": y})).equal
    z = torch.tensor([1.0, 0.0, 1.0, -math.inf])
    (c,) = diff(tmp_path / "a.pt", save(tmp_path, "c.pt", {"t": z})).changes
    assert c.n_diff == 2 and math.isnan(c.max_abs)  # a NaN against a number: no distance


def test_shape_and_dtype_changes(tmp_path):
    a = save(tmp_path, "a.pt", {"w": torch.zeros(2, 3), "v": torch.zeros(3)})
    b = save(tmp_path, "b.pt", {"w": torch.zeros(3, 2), "v": torch.zeros(3, dtype=torch.int32)})
    d = diff(a, b)
    assert {(c.path, c.kind, str(c.a), str(c.b)) for c in d.changes} == {
        ("w", "shape", "[2, 3]", "[3, 2]"), ("v", "dtype", "float32", "int32")}
    assert (d.tensors.compared, d.tensors.changed) == (2, 2)


def test_shared_storages_are_read_once_and_views_compare_by_value(tmp_path):
    base = torch.arange(40.0).reshape(5, 8)
    a = save(tmp_path, "a.pt", {"full": base, "t": base.t(), "row": base[2], "col": base[:, 3]})
    # B stores the same values in other layouts: contiguous copies, no sharing.
    b = save(tmp_path, "b.pt", {"full": base.clone(), "t": base.t().contiguous(),
                                "row": base[2].clone(), "col": base[:, 3].clone()})
    assert diff(a, b).equal
    changed = base.clone()
    changed[1, 3] = -1.0
    c = save(tmp_path, "c.pt", {"full": changed, "t": changed.t(), "row": changed[2],
                                "col": changed[:, 3]})
    d = diff(a, c)
    assert reported(d) == {"full": "tensor", "t": "tensor", "col": "tensor"}
    assert {c.path: c.n_diff for c in d.changes} == {"full": 1, "t": 1, "col": 1}


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool,
          torch.complex64]


@st.composite
def tensor_pairs(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    numel = math.prod(shape)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = (torch.randn(shape, generator=g) * 4).to(dtype) if dtype not in (torch.bool,) else (
        torch.rand(shape, generator=g) > 0.5)
    y = x.clone()
    if numel:
        for i in draw(st.lists(st.integers(0, numel - 1), max_size=5)):
            y.view(-1)[i] = 1 if dtype == torch.bool and not y.view(-1)[i] else (
                0 if dtype == torch.bool else y.view(-1)[i] + 1.5)
    perm_a = draw(st.permutations(range(ndim)))
    perm_b = draw(st.permutations(range(ndim)))
    return x, y, perm_a, perm_b


def _stored_as(t: torch.Tensor, perm: list[int]) -> torch.Tensor:
    """``t`` with the same values, its storage laid out in another dimension order."""
    if t.dim() == 0:
        return t.clone()
    inverse = [perm.index(i) for i in range(len(perm))]
    return t.permute(perm).contiguous().permute(inverse)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pair=tensor_pairs(), chunk=st.sampled_from([1, 3, 7, 64, 4 << 20]))
def test_chunked_statistics_equal_whole_tensor_statistics(tmp_path_factory, pair, chunk):
    x, y, perm_a, perm_b = pair
    tmp = tmp_path_factory.mktemp("pair")
    a = save(tmp, "a.pt", {"t": _stored_as(x, perm_a)})
    b = save(tmp, "b.pt", {"t": _stored_as(y, perm_b)})
    old_stats, old_compare = diff_module.STATS_CHUNK, serialization.COMPARE_CHUNK
    diff_module.STATS_CHUNK, serialization.COMPARE_CHUNK = chunk, max(chunk, 1) * 8
    try:
        d = diff(a, b)
    finally:
        diff_module.STATS_CHUNK, serialization.COMPARE_CHUNK = old_stats, old_compare
    differing = x != y
    n = int(differing.sum())
    if n == 0:
        assert d.equal
        return
    (c,) = d.changes
    assert c.n_diff == n and c.numel == x.numel()
    if x.dtype == torch.bool:
        return
    wide = torch.complex128 if x.is_complex() else torch.float64
    dist = (x.to(wide) - y.to(wide)).abs()
    assert c.max_abs == float(dist.max())
    rel = (dist / y.to(wide).abs()).masked_fill(~differing, 0)
    assert c.max_rel == float(rel.max())


def test_byte_comparison_reads_in_chunks(tmp_path, monkeypatch):
    x = torch.arange(1000, dtype=torch.float32)
    a = save(tmp_path, "a.pt", {"t": x})
    for where in (0, 1, 517, 999):
        y = x.clone()
        y[where] = -5
        b = save(tmp_path, f"b{where}.pt", {"t": y})
        monkeypatch.setattr(serialization, "COMPARE_CHUNK", 64)
        (c,) = diff(a, b).changes
        assert c.n_diff == 1 and c.max_abs == abs(where + 5)
    seen = []
    diff(a, a, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (4000, 4000)


# --- tolerances --------------------------------------------------------------------------------


def test_tolerances_follow_isclose(tmp_path):
    x = torch.tensor([1.0, 2.0, 100.0], dtype=torch.float64)
    y = torch.tensor([1.0 + 1e-7, 2.0, 100.001], dtype=torch.float64)
    a = save(tmp_path, "a.pt", {"t": x, "lr": 0.001})
    b = save(tmp_path, "b.pt", {"t": y, "lr": 0.0010000001})
    assert reported(diff(a, b)) == {"t": "tensor", "lr": "value"}
    (c,) = diff(a, b, atol=1e-6).changes  # only 100 vs 100.001 is beyond 1e-6
    assert (c.path, c.n_diff, c.max_abs) == ("t", 1, float((x - y).abs().max()))
    assert diff(a, b, atol=1e-6, rtol=1e-5).equal  # 1e-3 <= 1e-6 + 1e-5 * 100.001
    assert not diff(a, b, rtol=1e-6).equal
    # |x - y| <= atol + rtol * |y|, with y from B: the rule is not symmetric, as isclose's.
    assert torch.isclose(x, y, rtol=1e-5, atol=1e-6).all()


def test_tolerance_on_integers_and_exact_type_changes(tmp_path):
    a = save(tmp_path, "a.pt", {"epoch": 3, "step": 10})
    b = save(tmp_path, "b.pt", {"epoch": 3.0, "step": 11})
    assert reported(diff(a, b)) == {"epoch": "type", "step": "value"}
    assert reported(diff(a, b, atol=0.5)) == {"step": "value"}
    assert diff(a, b, atol=1).equal


def test_bad_tolerances_and_sections_are_refused():
    with pytest.raises(InputError, match="--only"):
        diff(COSINE, COSINE, only=["model"])
    with pytest.raises(InputError, match="rtol"):
        diff(COSINE, COSINE, rtol=-1)


# --- selection ---------------------------------------------------------------------------------


def test_only_selects_sections():
    b = FIXTURES / "tensor_lr.pt"
    everything = diff(COSINE, b)
    assert {c.section for c in everything.changes} == set(SECTIONS)
    for section in SECTIONS:
        d = diff(COSINE, b, only=[section])
        expected = {c.path for c in everything.changes
                    if c.section == section or (section == "tensors" and c.tensor)}
        assert {c.path for c in d.changes} == expected
    assert diff(COSINE, b, only=["scheduler"]).tensors.compared == 0
    assert diff(COSINE, b, only=["optimizer"]).schedulers == ()


def test_ignore_skips_paths_and_what_is_under_them(monkeypatch):
    b = FIXTURES / "tensor_lr.pt"
    d = diff(COSINE, b, ignore=["model", "optimizer/state/*", "epoch", "step"])
    paths = {c.path for c in d.changes}
    assert paths and not any(p.startswith(("model", "optimizer/state/")) or p in ("epoch", "step")
                             for p in paths)
    read = []
    real = serialization.same_bytes
    monkeypatch.setattr(diff_module, "same_bytes",
                        lambda a, b, pairs, **k: read.append(len(pairs)) or real(a, b, pairs, **k))
    assert diff(COSINE, COSINE, ignore=["*"]).equal and read == [0]  # no byte was read


def test_opaque_values_compare_by_content(tmp_path):
    d = diff(FIXTURES / "opaque.pt", FIXTURES / "opaque.pt")
    assert d.equal
    tree = serialization.read_checkpoint(FIXTURES / "opaque.pt").root
    opaque = [p for p, v in serialization.walk(tree) if isinstance(v, serialization.Opaque)]
    assert opaque, "the fixture holds an object of an unknown class"


# --- no torch unless tensors differ ------------------------------------------------------------


def test_equal_tensors_never_import_torch():
    code = ("import sys; from ckpttool.diffing import diff; "
            f"assert diff({str(COSINE)!r}, {str(FIXTURES / 'legacy.pt')!r}).equal; "
            f"d = diff({str(COSINE)!r}, {str(FIXTURES / 'findings/lr_mismatch.pt')!r}); "
            "assert not d.equal and d.tensors.changed == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr


# --- the command line --------------------------------------------------------------------------


def test_exit_codes_and_one_line_errors(run_cli, tmp_path):
    assert run_cli("diff", COSINE, FIXTURES / "findings/lr_mismatch.pt").exit_code == \
        EXIT_DIFFERENT
    for bad in (tmp_path / "missing.pt", FIXTURES / "bad/truncated.pt", FIXTURES / "bad/empty.pt",
                FIXTURES / "bad/malicious.pt", FIXTURES / "bad/json_renamed.pt"):
        result = run_cli("diff", COSINE, bad)
        assert result.exit_code == EXIT_ERROR
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("ckpttool: error: ")
    result = run_cli("diff", COSINE, COSINE, "--only", "model")
    assert result.exit_code == EXIT_ERROR and "--only" in result.stderr


def test_human_report(run_cli):
    result = run_cli("diff", COSINE, FIXTURES / "findings/lr_mismatch.pt")
    assert result.stdout.splitlines()[0] == \
        "optimizer: lr changed in 1 group; 0 of 16 tensors changed"
    assert "  group 0: lr 0.0006579634122155989 -> 0.0005" in result.stdout


def test_limit_shortens_long_lists(run_cli):
    b = FIXTURES / "tensor_lr.pt"
    long = run_cli("diff", COSINE, b, "--limit", "0").stdout
    short = run_cli("diff", COSINE, b, "--limit", "2").stdout
    assert "more (--limit 0 lists all)" in short and "more (" not in long
    full = json.loads(run_cli("diff", COSINE, b, "--json").stdout)
    cut = json.loads(run_cli("diff", COSINE, b, "--json", "--limit", "3").stdout)
    assert len(cut["changes"]) == 3 and cut["truncated"] == len(full["changes"]) - 3
    assert full["truncated"] == 0


def _check_diff_schema(doc: dict) -> None:
    assert doc["schema"] == "ckpttool.diff/1"
    assert isinstance(doc["equal"], bool) and isinstance(doc["summary"], str)
    assert set(doc["tensors"]) == {"compared", "changed", "added", "removed"}
    for c in doc["changes"]:
        assert c["kind"] in diff_module.KINDS and c["section"] in SECTIONS
        assert isinstance(c["path"], str)
        if c["kind"] == "tensor":
            assert {"max_abs", "max_rel", "n_diff", "numel"} <= set(c)
        elif c["kind"] == "added":
            assert "b" in c and "a" not in c
        elif c["kind"] == "removed":
            assert "a" in c and "b" not in c
        else:
            assert "a" in c and "b" in c
    for o in doc["optimizers"]:
        assert {"location", "class", "groups", "group_changes", "state"} <= set(o)
    for s in doc["schedulers"]:
        assert {"location", "class", "fields", "args"} <= set(s)
    assert doc["equal"] == (not doc["changes"] and not doc["truncated"])


@pytest.mark.parametrize("a, b", FIXTURE_PAIRS[:6] + [("adamw_cosine.pt", "adamw_cosine.pt")])
def test_json_schema(run_cli, a, b):
    result = run_cli("diff", "--json", FIXTURES / a, FIXTURES / b)
    doc = json.loads(result.stdout)
    _check_diff_schema(doc)
    assert result.exit_code == (EXIT_OK if doc["equal"] else EXIT_DIFFERENT)


def test_json_example_of_the_product_spec(run_cli):
    doc = json.loads(run_cli("diff", "--json", COSINE, FIXTURES / "findings/lr_mismatch.pt").stdout)
    assert doc["changes"] == [{"path": "optimizer/param_groups/0/lr", "kind": "value",
                               "section": "optimizer", "a": 0.0006579634122155989, "b": 0.0005}]
    assert doc["optimizers"][0]["group_changes"] == [
        {"index": 0, "changes": [{"key": "lr", "a": 0.0006579634122155989, "b": 0.0005}]}]


def test_a_copy_on_another_path_is_equal(tmp_path):
    copy = tmp_path / "copy.pt"
    shutil.copy(COSINE, copy)
    assert diff(COSINE, copy).equal


def test_statistics_without_numpy_come_from_torch(tmp_path, monkeypatch):
    """numpy is not a dependency: without it torch computes the same statistics."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 40, generator=g, dtype=torch.float64)
    y = x.clone()
    y[3, 7] = math.nan
    y[10, 1] += 2.5
    y[40, 39] = -0.0 if x[40, 39] == 0 else x[40, 39] * 3
    a, b = save(tmp_path, "a.pt", {"t": x}), save(tmp_path, "b.pt", {"t": y})
    with_numpy = diff(a, b).changes[0]
    monkeypatch.setattr(diff_module, "_numpy", lambda: None)
    without = diff(a, b).changes[0]
    assert with_numpy.n_diff == without.n_diff == 3
    assert repr((with_numpy.max_abs, with_numpy.max_rel)) == repr((without.max_abs,
                                                                   without.max_rel))
    assert math.isnan(with_numpy.max_abs)  # a NaN against a number has no distance
    monkeypatch.undo()
    y[3, 7] = x[3, 7]
    b = save(tmp_path, "c.pt", {"t": y})
    with_numpy = diff(a, b).changes[0]
    monkeypatch.setattr(diff_module, "_numpy", lambda: None)
    without = diff(a, b).changes[0]
    assert (with_numpy.n_diff, with_numpy.max_abs, with_numpy.max_rel) == (
        without.n_diff, without.max_abs, without.max_rel)
    assert with_numpy.max_abs == 2.5
