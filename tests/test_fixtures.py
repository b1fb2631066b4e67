"""The committed fixtures are what ``fixtures/make_fixtures.py`` makes (STYLE habit 7).

The script runs once into a temporary folder; every committed file is then compared with its
regenerated twin:

* torch files (``.pt`` / ``.ckpt`` outside ``bad/``) by *content*: the tree ckpttool's safe
  reader returns, with each tensor replaced by its dtype, shape, stride and a sha256 of its
  storage bytes. Content, not bytes, because ``legacy.pt`` keys its storages by memory address,
  so its bytes change on every run (zip files are byte-identical, but a content diff also says
  *where* two files differ).
* ``bad/`` byte for byte: those files are written as bytes, or cut from a zip torch.save
  output, which is byte-deterministic.
* ``dirs/`` (what the real frameworks write) byte for byte, since every file there is
  byte-deterministic, except two kinds: ``*.json`` (trainer_state.json) by parsed content, and
  DCP's ``.metadata``, which holds ``storage_meta.save_id``, a uuid4 drawn on every save:
  compared by its safely unpickled tree and by its bytes, with that one value masked. Torch
  files there are first compared by content as above, so a difference is named by tree path.

``made_with.json`` says what else the contents depend on (torch release, CPU kernels, numpy,
and for the ``dirs/`` fixtures the framework that wrote them); where this environment differs,
the comparison is skipped rather than failed.

Nothing here calls torch.load, so the hostile files in ``bad/`` are never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpttool.serialization import Opaque, TensorRef, read_checkpoint, safe_loads, walk

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SCRIPT = FIXTURES / "make_fixtures.py"

# Files in fixtures/ that the script does not write.
NOT_GENERATED = {"make_fixtures.py", "README.md", "LAYOUT.md"}
# Suffixes of the torch.save files the frameworks write in dirs/ (accelerate's .pkl included).
TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".ckpt"}
# The environment the files were made in: compared by reproducible_by(), not byte for byte.
MADE_WITH = "made_with.json"

# ATen CPU capabilities that give bit-identical results for these runs (checked by regenerating
# with ATEN_CPU_CAPABILITY=avx2 on an AVX512 machine). The scalar DEFAULT kernels do not: some
# init and training values differ in the last bit.
SAME_CPU_RESULTS = {"AVX2": "x86-simd", "AVX512": "x86-simd"}


def committed_files() -> list[str]:
    return sorted(
        p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*")
        if p.is_file() and p.name not in NOT_GENERATED | {MADE_WITH}
        and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixtures made afresh; the tests skip where the environment cannot reproduce them."""
    out = tmp_path_factory.mktemp("fixtures")
    # --allow-missing: without a framework, its fixtures are skipped (see frameworks_of).
    for _ in range(2):  # once more on failure: the two-rank DCP run picks a free port, which
        # another process can take before the ranks bind it
        done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--allow-missing"],
                              check=False, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            break
    if done.returncode != 0:
        pytest.fail(f"make_fixtures.py failed:\n{done.stderr}")
    ours = json.loads((out / MADE_WITH).read_text())
    theirs = json.loads((FIXTURES / MADE_WITH).read_text())
    if reproducible_by(ours) != reproducible_by(theirs):
        pytest.skip(f"fixtures were made with {theirs}, this environment is {ours}; their "
                    "contents legitimately differ (rerun fixtures/make_fixtures.py to update)")
    return out


def reproducible_by(made_with: dict[str, str]) -> tuple[str, str, str]:
    """The parts of made_with.json that must match for the same contents."""
    cpu = made_with["cpu_capability"]
    # numpy: only the 1 -> 2 move of numpy.core to numpy._core changes a pickled name.
    return made_with["torch"], SAME_CPU_RESULTS.get(cpu, cpu), made_with["numpy"].split(".")[0]


def frameworks_of(made_with: dict[str, Any], rel: str) -> dict[str, str | None]:
    """The versions of the frameworks that wrote fixture file ``rel`` (None: not installed).

    Their releases change file names, keys and values, so a different version skips only the
    files that framework wrote."""
    versions = made_with.get("frameworks", {})
    return {name: versions.get(name)
            for fixture, names in made_with.get("needs", {}).items()
            if rel == fixture or rel.startswith(fixture + "/") for name in names}


def test_every_generated_file_is_committed(regenerated: Path) -> None:
    made = {p.relative_to(regenerated).as_posix() for p in regenerated.rglob("*") if p.is_file()}
    assert sorted(made - set(committed_files()) - {MADE_WITH}) == []


@pytest.mark.parametrize("rel", committed_files())
def test_committed_file_matches_regenerated(rel: str, regenerated: Path) -> None:
    ours, theirs = regenerated / rel, FIXTURES / rel
    made_by = frameworks_of(json.loads((FIXTURES / MADE_WITH).read_text()), rel)
    here = frameworks_of(json.loads((regenerated / MADE_WITH).read_text()), rel)
    if here != made_by:
        pytest.skip(f"{rel} was written by {made_by}, this environment has {here} (install the "
                    "test extra, or rerun fixtures/make_fixtures.py to update)")
    if not ours.exists():
        pytest.fail(f"{rel} is committed but make_fixtures.py no longer writes it")
    if rel.startswith("bad/"):
        assert_same_bytes(rel, theirs.read_bytes(), ours.read_bytes())
    elif rel.startswith("dirs/"):
        assert_same_framework_file(rel, theirs, ours)
    else:
        assert canonical(theirs) == canonical(ours)


def assert_same_bytes(rel: str, a: bytes, b: bytes) -> None:
    where = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                 min(len(a), len(b)))
    assert a == b, f"{rel}: {len(a)} vs {len(b)} bytes, first difference at byte {where}"


def assert_same_framework_file(rel: str, theirs: Path, ours: Path) -> None:
    """The rule for one file a framework wrote (see the module docstring)."""
    if ours.suffix == ".json":
        # trainer_state.json holds no time or path (train_runtime is logged only after the
        # last checkpoint), so every field is compared.
        assert json.loads(theirs.read_text()) == json.loads(ours.read_text())
        return
    if ours.name == ".metadata":
        (tree_a, bytes_a), (tree_b, bytes_b) = dcp_metadata(theirs), dcp_metadata(ours)
        assert tree_a == tree_b
        assert_same_bytes(rel, bytes_a, bytes_b)
        return
    if ours.suffix in TORCH_SUFFIXES:
        assert canonical(theirs) == canonical(ours)
    # .safetensors and .distcp are deterministic too; a .distcp shard is torch.save blobs
    # end to end, which no content reader here walks.
    assert_same_bytes(rel, theirs.read_bytes(), ours.read_bytes())


# Where DCP's .metadata keeps the uuid4 it draws on every save (StorageMeta.save_id).
SAVE_ID = ("'storage_meta'", "'__state__'", "'save_id'")


def dcp_metadata(path: Path) -> tuple[dict[str, Any], bytes]:
    """A DCP .metadata as (its safely unpickled tree, its bytes), save_id masked in both."""
    raw = path.read_bytes()
    root, _ = safe_loads(raw)
    tree = tree_description(root, lambda ref: pytest.fail(f"{path}: a tensor in .metadata"))
    (key,) = [k for k in tree if tuple(k.split("/")[-3:]) == SAVE_ID]
    _, save_id = tree[key]
    assert isinstance(save_id, str) and raw.count(save_id.encode()) == 1
    tree[key] = ("str", "<save_id>")
    return tree, raw.replace(save_id.encode(), b"?" * len(save_id))


def canonical(path: Path) -> dict[str, Any]:
    """A checkpoint as {tree path: leaf description}: equal for equal contents, and a pytest
    diff of two of them names the paths that differ."""
    ckpt = read_checkpoint(path)
    storage_order: dict[str, int] = {}  # storage key -> order of first use (keys are addresses)
    digests: dict[str, str] = {}

    def describe_tensor(value: TensorRef) -> Any:
        storage = value.storage
        if storage is None:
            return ("tensor", value.dtype, value.shape, value.stride, "meta")
        if storage.key not in digests:
            storage_order[storage.key] = len(storage_order)
            digests[storage.key] = hashlib.sha256(ckpt.read_storage(storage)).hexdigest()
        return ("tensor", value.dtype, value.shape, value.stride, value.storage_offset,
                value.requires_grad, value.parameter, value.subclass, storage.location,
                storage.storage_type, storage.numel, storage_order[storage.key],
                digests[storage.key])

    tree = tree_description(ckpt.root, describe_tensor)
    tree["<file>"] = (ckpt.kind, tuple(ckpt.globals_seen))
    return tree


def tree_description(root: Any, describe_tensor: Callable[[TensorRef], Any]) -> dict[str, Any]:
    """{tree path: leaf description} of a safely unpickled tree."""

    def describe(value: Any) -> Any:
        if isinstance(value, TensorRef):
            return describe_tensor(value)
        if isinstance(value, dict):
            return (type(value).__name__, tuple(repr(k) for k in value))  # keys and their order
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, len(value))
        if isinstance(value, Opaque):  # its args / state / items are walked as children
            return ("opaque", value.dotted, value.how, repr(sorted(value.kwargs.items())))
        if isinstance(value, float):
            return ("float", repr(value))  # repr round-trips exactly, and NaN equals NaN
        if value is None or isinstance(value, (bool, int, str, bytes)):
            return (type(value).__name__, value)
        return (type(value).__name__, repr(value))  # dtype, device and storage markers

    return {"/".join(repr(k) for k in p): describe(v) for p, v in walk(root)}
