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
    SafeUnpickler,
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


def _memo_bomb(levels: int) -> bytes:
    # Each list holds the previous one twice: 2**levels paths, `levels` distinct objects.
    ops = [pickle.PROTO + b"\x02", pickle.EMPTY_LIST, pickle.BINPUT + b"\x00"]
    for i in range(1, levels + 1):
        prev = pickle.BINGET + bytes([i - 1])
        ops += [pickle.EMPTY_LIST, prev, pickle.APPEND, prev, pickle.APPEND,
                pickle.BINPUT + bytes([i])]
    return b"".join(ops) + pickle.STOP


def test_memo_bomb_is_refused_and_walks_in_linear_time(tmp_path):
    # Refused on reading: every recursive reader of the tree (repr, render, JSON) would expand it.
    path = tmp_path / "bomb.pt"
    _write_zip(path, _memo_bomb(60))
    with pytest.raises(InputError, match="billion laughs"):
        read_checkpoint(path)
    # Sharing alone is fine: a tree a few levels deep reads, and walk visits each list once.
    small, bomb = [], []
    for i in range(60):
        small = [small, small] if i < 10 else small
        bomb = [bomb, bomb]
    assert safe_loads(_memo_bomb(10))[0] == small
    assert sum(1 for _ in walk(bomb)) < 200


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


# --- hostile pickles ---------------------------------------------------------------------------


def _g(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _s(text: str) -> bytes:
    raw = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _i(n: int) -> bytes:
    return pickle.BININT + struct.pack("<i", n)


def _call(global_: bytes, *args: bytes) -> bytes:
    return global_ + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _dict(*items: bytes) -> bytes:
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(items) + pickle.SETITEMS


def _pickle(body: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + body + pickle.STOP


def _system(canary) -> bytes:
    return _call(_g("posix", "system"), _s(f"touch {canary}"))


_STORAGE = (pickle.MARK + _s("storage") + _g("torch", "FloatStorage") + _s("0") + _s("cpu")
            + _i(4) + pickle.TUPLE + pickle.BINPERSID)


def _slots(*items: bytes) -> bytes:
    # BUILD state (None, {...}): setattr on the object, whatever it is
    return pickle.NONE + _dict(*items) + pickle.TUPLE2


@pytest.mark.parametrize("target, state", [
    (_g("collections", "Counter"), _slots(_s("elements"), _g("builtins", "set"))),
    (_g("torch._utils", "_rebuild_tensor_v2"), _slots(_s("__defaults__"), _i(1) + pickle.TUPLE1)),
    (_g("ckpttool_test", "Config"), _slots(_s("dotted"), _s("posix.system"))),
    (_g("torch", "float32"), _slots(_s("name"), _s("int64"))),
    (_call(_g("torch._utils", "_rebuild_tensor_v2"), _STORAGE, _i(0), _i(4) + pickle.TUPLE1,
           _i(1) + pickle.TUPLE1), _dict(_s("shape"), _s("a str"))),
], ids=["Counter", "rebuilder", "opaque-class", "dtype", "tensor"])
def test_build_changes_nothing_the_unpickler_hands_out(tmp_path, target, state):
    import collections

    from ckpttool import serialization

    path = tmp_path / "poison.pt"
    _write_zip(path, _pickle(target + state + pickle.BUILD))
    with pytest.raises(InputError, match="damaged or hostile|corrupted"):
        read_checkpoint(path)
    assert collections.Counter.elements is not set and collections.Counter("aab")["a"] == 2
    assert serialization._rebuild_tensor_v2.__defaults__ == (False, None, None)
    assert serialization.opaque_class("ckpttool_test", "Config").dotted == "ckpttool_test.Config"
    with pytest.raises(TypeError):
        serialization.opaque_class("ckpttool_test", "Config").dotted = "posix.system"
    # The same globals, used as torch uses them, still read.
    value, _ = safe_loads(_pickle(_call(_g("collections", "Counter"), _dict(_s("a"), _i(2)))))
    assert value == collections.Counter(a=2)


def test_ordered_dict_state_is_kept_unless_it_hides_a_method(tmp_path):
    od = _call(_g("collections", "OrderedDict")) + pickle.MARK + _s("w") + _i(1) + pickle.SETITEMS
    # model state dicts carry their _metadata as the OrderedDict's own attribute
    value, _ = safe_loads(_pickle(od + _dict(_s("_metadata"), _dict()) + pickle.BUILD))
    assert value == {"w": 1} and value._metadata == {}
    path = tmp_path / "shadow.pt"
    _write_zip(path, _pickle(_dict(_s("optimizer"), od + _dict(_s("get"), _i(1)) + pickle.BUILD)))
    with pytest.raises(InputError, match="'get'.*hostile"):
        load(path)


def _zip_records(path, records):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records:
            zf.writestr(name, data)


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("names", [
    ("archive/data.pkl", "archive/data.pkl"),
    ("archive/data.pkl", "archive/DATA.pkl"),  # torch's miniz finds records ignoring case
    ("evil/data.pkl", "archive/data.pkl"),
])
@pytest.mark.parametrize("evil_first", [True, False])
def test_zips_with_two_pickles_are_refused(tmp_path, names, evil_first):
    canary = tmp_path / "canary"
    pickles = [_pickle(_system(canary)), _pickle(_dict(_s("which"), _s("benign")))]
    if not evil_first:
        pickles.reverse()
    path = tmp_path / "dup.pt"
    _zip_records(path, [*zip(names, pickles), ("archive/version", b"3\n")])
    with pytest.raises(InputError, match="hostile"):
        load(path)
    assert not canary.exists()


def test_every_legacy_pickle_is_checked(tmp_path):
    # A legacy file is five pickles; a call hidden in the system-info one is still reported.
    canary = tmp_path / "canary"
    good = _save(tmp_path, {"lr": 0.1}, "good.pt", legacy=True).read_bytes()
    f = io.BytesIO(good)
    bounds = []
    for _ in range(3):  # magic number, protocol version, system info
        SafeUnpickler(f, legacy=True).load()
        bounds.append(f.tell())
    path = tmp_path / "evil.pt"
    path.write_bytes(good[:bounds[1]] + _pickle(_system(canary)) + good[bounds[2]:])
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load(path)
    assert not canary.exists()


@pytest.mark.parametrize("dotted, dangerous", [
    ("code.interact", True),
    ("code.InteractiveConsole.push", True),  # a protocol-4 qualified name in module code
    ("code.config.TrainConfig", False),  # a user's own package named `code`
    ("trace.utils.Tracer", False),
    ("profile.Profile", True),
    ("signal.pthread_kill", True),
    ("platform.popen", True),
    ("http.HTTPStatus", False),
    ("http.server.test", True),
    ("pydoc.pipepager", True),
    ("_posixsubprocess.fork_exec", True),
    ("os.path.join", True),
    ("types.FunctionType", True),
    ("types.SimpleNamespace", False),
    ("operator.attrgetter", True),
    ("_operator.methodcaller", True),
    ("torch.storage._load_from_bytes", True),  # a nested torch.load
    ("torch.serialization._legacy_load", True),
    ("torch.serialization._get_layout", False),
    ("builtins.__build_class__", True),
    ("numpy.testing._private.utils.runstring", True),
    ("numpy._core.multiarray.scalar", False),
])
def test_dangerous_globals(dotted, dangerous):
    from ckpttool.serialization import is_dangerous_global

    assert is_dangerous_global(dotted) is dangerous


def test_a_user_package_named_like_a_stdlib_module_is_not_hostile(tmp_path):
    from ckpttool.inspection import _weights_only_allows

    config = _g("code.config", "TrainConfig") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
    path = tmp_path / "ok.pt"
    _write_zip(path, _pickle(_dict(_s("cfg"), config + _dict(_s("lr"), _i(1)) + pickle.BUILD)))
    assert load(path).unsafe_globals == ("code.config.TrainConfig",)
    _write_zip(path, _pickle(_dict(_s("cfg"), _call(_g("code", "interact")))))
    with pytest.raises(UnsafeCheckpointError, match="code.interact"):
        load(path)
    # torch's weights-only loader allows dtypes in torch, not any lowercase name there
    assert _weights_only_allows("torch.bfloat16") and _weights_only_allows("torch.device")
    assert not _weights_only_allows("torch.storage._load_from_bytes")


def test_decoding_calls_are_refused_or_kept_opaque():
    # bytes as protocol 2 spells them decode; another codec (it would import its module, and
    # punycode is quadratic) or a bytearray of a size (a gigabyte from 20 bytes) stay records.
    modules = set(sys.modules)
    value, _ = safe_loads(_pickle(
        pickle.MARK + _call(_g("_codecs", "encode"), _s("\xff\x00"), _s("latin1"))
        + _call(_g("_codecs", "encode"), _s("x" * 5000), _s("punycode"))
        + _call(_g("builtins", "bytearray"), _s("ab"), _s("latin-1"))
        + _call(_g("builtins", "bytearray"), _i(10**9)) + pickle.TUPLE))
    assert value[0] == b"\xff\x00" and value[2] == bytearray(b"ab")
    assert [v.dotted for v in value[1::2]] == ["_codecs.encode", "builtins.bytearray"]
    assert not {m for m in set(sys.modules) - modules if m.startswith("encodings")}


def test_extension_codes_never_reach_a_global(tmp_path):
    import copyreg

    data = _pickle(_dict(_s("x"), pickle.EXT2 + struct.pack("<H", 0xCA7) + pickle.EMPTY_TUPLE
                         + pickle.REDUCE))
    path = tmp_path / "ext.pt"
    _write_zip(path, data)
    with pytest.raises(InputError, match="corrupted"):  # none registered: the unpickler refuses
        read_checkpoint(path)
    copyreg.add_extension("ckpttool_canary_module", "Thing", 0xCA7)
    try:
        with pytest.raises(InputError, match="EXT1/2/4"):
            read_checkpoint(path)
    finally:
        copyreg.remove_extension("ckpttool_canary_module", "Thing", 0xCA7)
    assert "ckpttool_canary_module" not in sys.modules


@pytest.mark.parametrize("record", ["data.pkl", "data/0"])
def test_compressed_records_are_refused(tmp_path, record):
    src, packed = _save(tmp_path, {"lr": torch.tensor(0.5)}), tmp_path / "packed.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(packed, "w") as zout:
        for info in zin.infolist():  # what `zip -r` does to a checkpoint
            method = zipfile.ZIP_DEFLATED if info.filename.endswith(record) else zipfile.ZIP_STORED
            zout.writestr(info.filename, zin.read(info), method)
    with pytest.raises(InputError, match=r"compressed \(deflate\).*zip -0"):
        read_checkpoint(packed)


def test_copying_a_shared_object_again_and_again_is_refused():
    # set(x) of one memoized 100,000-item list, 1,000 times: 10**8 items from 100 KB of pickle
    items = pickle.MARK + _i(7) + pickle.DUP * 99_999 + pickle.LIST + pickle.BINPUT + b"\x01"
    copy = _g("builtins", "set") + pickle.BINGET + b"\x01" + pickle.TUPLE1 + pickle.REDUCE
    opaque = _g("m", "C") + pickle.BINGET + b"\x01" + pickle.TUPLE1 + pickle.REDUCE
    for call in (copy, opaque):
        with pytest.raises(pickle.UnpicklingError, match="billion laughs"):
            safe_loads(_pickle(items + pickle.MARK + call * 1000 + pickle.LIST))
    # a cycle is a single value, not an infinite tree
    value, _ = safe_loads(_pickle(pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + pickle.BINGET
                                  + b"\x00" + pickle.APPEND))
    assert value[0] is value


def test_opaque_keys_hash_apart_and_consistently():
    # 20,000 instances of one class as dict keys: one hash per class made this quadratic
    body = _dict(*(_call(_g("m", "Key"), _i(k)) + _i(0) for k in range(20_000)))
    value, _ = safe_loads(_pickle(body))
    assert len(value) == 20_000 and len({hash(k) for k in value}) == 20_000
    a, b = [Opaque.__new__(Opaque, b"x", 1.0) for _ in range(2)]
    a.state, b.state = {"k": 1}, __import__("collections").OrderedDict(k=1)
    b.args = (bytearray(b"x"), 1)  # equal values of other types
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize("tensor", [
    _call(_g("torch._utils", "_rebuild_tensor_v2"), _i(5), _i(0), pickle.EMPTY_TUPLE,
          pickle.EMPTY_TUPLE, pickle.NEWFALSE, pickle.NONE),
    _call(_g("torch._utils", "_rebuild_tensor_v2"), _STORAGE, _i(0),
          _call(_g("m", "Shape")), pickle.EMPTY_TUPLE, pickle.NEWFALSE, pickle.NONE),
    _call(_g("torch._utils", "_rebuild_tensor_v2"), _STORAGE, _i(0), _i(2) + pickle.TUPLE1,
          _i(-1) + pickle.TUPLE1, pickle.NEWFALSE, pickle.NONE),
    _call(_g("torch._utils", "_rebuild_tensor_v2"), _STORAGE, _i(0), _i(2) + pickle.TUPLE1,
          pickle.EMPTY_TUPLE, pickle.NEWFALSE, pickle.NONE),
    _call(_g("torch._utils", "_rebuild_tensor_v3"), _STORAGE, _i(0), pickle.EMPTY_TUPLE,
          pickle.EMPTY_TUPLE, pickle.NEWFALSE, pickle.NONE, _s("float32")),
    _call(_g("torch._utils", "_rebuild_tensor"), _STORAGE, _s("0"), pickle.EMPTY_TUPLE,
          pickle.EMPTY_TUPLE),
    _call(_g("torch._utils", "_rebuild_meta_tensor_no_storage"), _g("torch", "float32"),
          pickle.EMPTY_LIST, _i(1) + pickle.TUPLE1, pickle.NEWFALSE),
    _call(_g("torch._utils", "_rebuild_parameter"), _i(3), pickle.NEWTRUE, pickle.NONE),
], ids=["int-storage", "opaque-size", "negative-stride", "rank-mismatch", "str-dtype",
        "str-offset", "meta-rank-mismatch", "int-parameter"])
def test_malformed_tensors_are_a_clean_error(tmp_path, tensor):
    path = tmp_path / "odd.pt"
    _write_zip(path, _pickle(_dict(_s("lr"), tensor)))
    with pytest.raises(InputError, match="corrupted"):
        load(path)


def test_a_parameter_of_an_unmodelled_tensor_is_recorded_whole():
    qtensor = _call(_g("torch._utils", "_rebuild_qtensor"), _i(1))
    value, _ = safe_loads(_pickle(_call(_g("torch._utils", "_rebuild_parameter_with_state"),
                                        qtensor, pickle.NEWTRUE, pickle.NONE, pickle.NONE)))
    assert value.dotted == "torch._utils._rebuild_parameter_with_state"
    assert value.args[0].dotted == "torch._utils._rebuild_qtensor" and len(value.args) == 4


def _numpy_scalar(module: str, code: str, state: bytes, raw: bytes) -> bytes:
    dtype = (_call(_g("numpy", "dtype"), _s(code), pickle.NEWFALSE, pickle.NEWTRUE)
             + state + pickle.BUILD)
    return _call(_g(module, "scalar"), dtype,
                 pickle.SHORT_BINBYTES + bytes([len(raw)]) + raw)


def _dtype_state(order: str = "<", version: int = 3) -> bytes:
    return (pickle.MARK + _i(version) + _s(order) + pickle.NONE * 3 + _i(-1) + _i(-1) + _i(0)
            + pickle.TUPLE)


@pytest.mark.parametrize("module", ["numpy.core.multiarray", "numpy._core.multiarray"])
@pytest.mark.parametrize("code, order, raw, expected", [
    ("f8", "<", struct.pack("<d", 0.01), 0.01),
    ("f8", ">", struct.pack(">d", 0.01), 0.01),
    ("f4", "<", struct.pack("<f", 0.5), 0.5),
    ("f2", "<", struct.pack("<e", 0.25), 0.25),
    ("i8", "<", struct.pack("<q", -3), -3),
    ("u1", "|", b"\x07", 7),
    ("b1", "|", b"\x01", True),
])
def test_numpy_scalars_are_decoded_without_numpy(module, code, order, raw, expected):
    from ckpttool.serialization import scalar_value

    value, _ = safe_loads(_pickle(_numpy_scalar(module, code, _dtype_state(order), raw)))
    assert isinstance(value, Opaque)  # kept as read, so that a rewrite writes the same bytes
    decoded = scalar_value(value)
    assert decoded == expected and type(decoded) is type(expected)


@pytest.mark.parametrize("scalar", [
    _numpy_scalar("numpy._core.multiarray", "c8", _dtype_state(), bytes(8)),  # complex
    _numpy_scalar("numpy._core.multiarray", "f8", _dtype_state(version=4), bytes(8)),
    _numpy_scalar("numpy._core.multiarray", "f8", _dtype_state(), bytes(4)),  # short
    _numpy_scalar("numpy._core.multiarray", "f8", pickle.NONE, bytes(8)),
    _numpy_scalar("mypkg", "f8", _dtype_state(), bytes(8)),
], ids=["complex", "dtype-state-4", "short-bytes", "no-dtype-state", "not-numpy"])
def test_unusual_numpy_scalars_stay_opaque(scalar):
    from ckpttool.serialization import scalar_value

    value, _ = safe_loads(_pickle(scalar))
    assert scalar_value(value) is value
    assert scalar_value(0.1) == 0.1


def test_a_real_numpy_lr_is_decoded(tmp_path):
    np = pytest.importorskip("numpy")
    from ckpttool.serialization import scalar_value

    lrs = np.logspace(-3, -1, 3)
    ckpt = read_checkpoint(_save(tmp_path, {"lr": lrs[1], "steps": np.int64(7)}))
    assert scalar_value(ckpt.root["lr"]) == float(lrs[1])
    assert scalar_value(ckpt.root["steps"]) == 7
