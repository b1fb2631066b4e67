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

``made_with.json`` says what else the contents depend on (torch release, CPU kernels, numpy);
where this environment differs, the comparison is skipped rather than failed.

Nothing here calls torch.load, so the hostile files in ``bad/`` are never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckpttool.serialization import Opaque, TensorRef, read_checkpoint, walk

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SCRIPT = FIXTURES / "make_fixtures.py"

# Files in fixtures/ that the script does not write.
NOT_GENERATED = {"make_fixtures.py", "README.md"}
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
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
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


def test_every_generated_file_is_committed(regenerated: Path) -> None:
    made = {p.relative_to(regenerated).as_posix() for p in regenerated.rglob("*") if p.is_file()}
    assert sorted(made - set(committed_files()) - {MADE_WITH}) == []


@pytest.mark.parametrize("rel", committed_files())
def test_committed_file_matches_regenerated(rel: str, regenerated: Path) -> None:
    ours, theirs = regenerated / rel, FIXTURES / rel
    if not ours.exists():
        pytest.fail(f"{rel} is committed but make_fixtures.py no longer writes it")
    if rel.startswith("bad/"):
        a, b = theirs.read_bytes(), ours.read_bytes()
        where = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                     min(len(a), len(b)))
        assert a == b, f"{rel}: {len(a)} vs {len(b)} bytes, first difference at byte {where}"
    else:
        assert canonical(theirs) == canonical(ours)


def canonical(path: Path) -> dict[str, Any]:
    """A checkpoint as {tree path: leaf description}: equal for equal contents, and a pytest
    diff of two of them names the paths that differ."""
    ckpt = read_checkpoint(path)
    storage_order: dict[str, int] = {}  # storage key -> order of first use (keys are addresses)
    digests: dict[str, str] = {}

    def describe(value: Any) -> Any:
        if isinstance(value, TensorRef):
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

    tree = {"/".join(repr(k) for k in p): describe(v) for p, v in walk(ckpt.root)}
    tree["<file>"] = (ckpt.kind, tuple(ckpt.globals_seen))
    return tree
