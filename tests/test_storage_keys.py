import math

import numpy as np
import pytest

from storage import StageKey, canonical_json, hash_file, hash_params
from storage.hashing import hash_files


def base_key(**over):
    args = dict(stage="audio", code_version="1", params={"tau": 0.25, "n_mels": 128},
                inputs={"clip": "a" * 64}, upstream={"catalog": "c" * 64})
    args.update(over)
    return StageKey.build(**args)


def test_key_is_stable_and_order_independent():
    a = base_key()
    b = StageKey.build("audio", 1, {"n_mels": 128, "tau": 0.25}, {"clip": "a" * 64}, {"catalog": "c" * 64})
    assert a.key == b.key
    assert len(a.key) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"stage": "video"},
        {"code_version": "2"},
        {"params": {"tau": 0.5, "n_mels": 128}},
        {"params": {"tau": 0.25, "n_mels": 128, "extra": None}},
        {"inputs": {"clip": "b" + "a" * 63}},
        {"inputs": {"clip2": "a" * 64}},
        {"upstream": {"catalog": "d" + "c" * 63}},
        {"upstream": {}},
    ],
)
def test_key_changes_when_any_part_changes(change):
    assert base_key(**change).key != base_key().key


def test_key_changes_with_any_input_byte(tmp_path):
    f = tmp_path / "clip.wav"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    f.write_bytes(bytes(data))
    k0 = base_key(inputs={"clip": hash_file(f)}).key
    assert base_key(inputs={"clip": hash_file(f)}).key == k0  # same bytes, same key
    for pos in (0, 2500, 4999):
        changed = bytearray(data)
        changed[pos] ^= 1
        f.write_bytes(bytes(changed))
        assert base_key(inputs={"clip": hash_file(f)}).key != k0
    f.write_bytes(bytes(data))
    assert base_key(inputs={"clip": hash_file(f)}).key == k0


def test_streamed_hash_equals_whole_file_hash(tmp_path):
    import hashlib

    f = tmp_path / "big.bin"
    payload = np.random.default_rng(1).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    f.write_bytes(payload)
    assert hash_file(f, chunk_bytes=4096) == hashlib.sha256(payload).hexdigest() == hash_file(f)


def test_folder_hash_binds_names_to_content(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"1")
    (tmp_path / "b.jpg").write_bytes(b"2")
    h = hash_files([("a.jpg", tmp_path / "a.jpg"), ("b.jpg", tmp_path / "b.jpg")])
    swapped = hash_files([("a.jpg", tmp_path / "b.jpg"), ("b.jpg", tmp_path / "a.jpg")])
    reordered = hash_files([("b.jpg", tmp_path / "b.jpg"), ("a.jpg", tmp_path / "a.jpg")])
    assert h != swapped
    assert h == reordered


def test_canonical_params():
    assert canonical_json({"b": 1, "a": (1, 2.0)}) == '{"a":[1,2],"b":1}'
    assert hash_params({"x": 2}) == hash_params({"x": 2.0})
    assert hash_params({"x": float("nan")}) != hash_params({"x": float("inf")})
    assert hash_params({"x": math.pi}) != hash_params({"x": 3.14159})
    with pytest.raises(TypeError, match="cannot hash parameter"):
        hash_params({"x": object()})


def test_diff_names_the_reason():
    k = base_key()
    old = base_key(code_version="0", params={"tau": 1.0, "n_mels": 128}, upstream={"catalog": "x"})
    reasons = k.diff(code_version=old.code_version, params_hash=old.params_hash,
                     inputs_hash=old.inputs_hash, upstream=old.upstream)
    assert reasons == ["code_version 0 -> 1", "parameters changed", "upstream changed: catalog"]
    assert k.diff(code_version="1", params_hash=k.params_hash, inputs_hash=k.inputs_hash, upstream=k.upstream) == []
