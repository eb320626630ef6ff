"""The content-addressed cache: keyed by content, atomic, and a corrupt or truncated file is rebuilt."""
from __future__ import annotations

import pytest
import torch

from helpers import cache


def counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value

    return compute, calls


def test_second_call_reads_instead_of_computing(tmp_path):
    compute, calls = counting({"x": torch.arange(3)})
    first = cache.cached("thing", {"p": 1}, compute, cache_dir=tmp_path)
    second = cache.cached("thing", {"p": 1}, compute, cache_dir=tmp_path)
    assert len(calls) == 1 and torch.equal(first["x"], second["x"])


def test_key_content_changes_the_entry(tmp_path):
    compute, calls = counting(1)
    cache.cached("thing", {"weights": torch.zeros(3)}, compute, cache_dir=tmp_path)
    cache.cached("thing", {"weights": torch.tensor([0.0, 0.0, 1e-7])}, compute, cache_dir=tmp_path)
    cache.cached("thing", {"weights": torch.zeros(3)}, compute, cache_dir=tmp_path)
    assert len(calls) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_damaged_file_is_rebuilt_not_trusted(tmp_path, damage):
    compute, calls = counting(torch.arange(1000))
    cache.cached("thing", "key", compute, cache_dir=tmp_path)
    path = cache.cache_path("thing", "key", tmp_path)
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-10] ^= 0xFF
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "garbage":
        blob = bytearray(b"not a cache file at all")
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError):
        cache.read(path)
    value = cache.cached("thing", "key", compute, cache_dir=tmp_path)
    assert len(calls) == 2 and torch.equal(value, torch.arange(1000))
    assert torch.equal(cache.read(path), torch.arange(1000))


def test_write_leaves_no_temporary_files(tmp_path):
    cache.write(tmp_path / "a.pt", [1, 2, 3])
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_fingerprint_is_stable_and_sensitive():
    module = torch.nn.Linear(3, 2)
    assert cache.fingerprint(module) == cache.fingerprint(module)
    before = cache.fingerprint(module)
    with torch.no_grad():
        module.weight[0, 0] += 1
    assert cache.fingerprint(module) != before
    assert cache.fingerprint({"a": 1, "b": 2}) == cache.fingerprint({"b": 2, "a": 1})
    assert cache.fingerprint(torch.zeros(2, dtype=torch.float32)) != cache.fingerprint(torch.zeros(2, dtype=torch.float64))
