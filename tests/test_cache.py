"""The content-addressed cache: keyed by content, atomic, a corrupt or truncated file is rebuilt (with a warning), an
unwritable cache still returns the value, killed writers' temp files are cleaned, and only plain data is loaded."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import time
import warnings

import pytest
import torch

from helpers.core import cache
from helpers.studies.heuristic_scheme import HeuristicScores


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


def flip_last_byte(path):
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))


def cache_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, cache.CacheWarning)]


def test_rebuilding_an_unreadable_entry_warns_once_naming_the_file(tmp_path):
    compute, calls = counting(torch.arange(10))
    cache.cached("thing", "key", compute, cache_dir=tmp_path)
    path = cache.cache_path("thing", "key", tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            flip_last_byte(path)
            cache.cached("thing", "key", compute, cache_dir=tmp_path)
    messages = cache_warnings(caught)
    assert len(calls) == 3 and len(messages) == 1
    assert str(path) in messages[0] and "fails its checksum" in messages[0] and "recomputing" in messages[0]


def test_reading_a_sound_entry_does_not_warn(tmp_path):
    compute, _ = counting(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache.cached("thing", "key", compute, cache_dir=tmp_path)
        cache.cached("thing", "key", compute, cache_dir=tmp_path)
    assert cache_warnings(caught) == []


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_unwritable_cache_returns_the_computed_value_with_a_warning(tmp_path, where):
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    blocker = tmp_path / "cache"
    if where == "read-only":
        blocker.mkdir(mode=0o500)
    else:
        blocker.write_text("not a folder")
    cache_dir = blocker / "sub" if where == "under a file" else blocker
    compute, calls = counting({"x": torch.arange(3)})
    with pytest.warns(cache.CacheWarning, match="could not store") as record:
        value = cache.cached("thing", "key", compute, cache_dir=cache_dir)
    assert torch.equal(value["x"], torch.arange(3)) and len(calls) == 1
    assert str(cache.cache_path("thing", "key", cache_dir)) in str(record[0].message)


def test_write_removes_only_the_stale_temp_files_of_killed_writers(tmp_path):
    stale = tmp_path / ".sae-0123456789abcdef0123.pt-k1ll3d_x"   # what mkstemp names a writer's temp file
    in_flight = tmp_path / ".sae-0123456789abcdef0123.pt-wr1t1ng_"
    unrelated = tmp_path / ".notes"
    for file in (stale, in_flight, unrelated):
        file.write_bytes(b"half a payload")
    long_ago = time.time() - 2 * cache.STALE_AFTER_S
    for file in (stale, unrelated):
        os.utime(file, (long_ago, long_ago))
    cache.cached("thing", "key", lambda: 1, cache_dir=tmp_path)
    assert not stale.exists() and in_flight.exists() and unrelated.exists()


def heuristic_scores() -> HeuristicScores:
    return HeuristicScores(neurons=[(1, 5), (2, 7)], names=["op1_mod_2=0", "result_range_10"],
                           scores=torch.rand(2, 2), from_bottom=torch.tensor([[True, False], [False, False]]),
                           extra=[{"result_multi_value_2=[1, 2]": 0.25}, {}])


def sae_entry() -> dict:
    """What `sae_training.cached_saes` stores: per hook, the SAE as plain dicts and its training stats as a dict (skipped
    where sae-lens is not installed, as in the transformer-lens 4 environment)."""
    pytest.importorskip("sae_lens")
    from helpers.techniques import sae as S
    from helpers.techniques import sae_training as T

    hook = "blocks.0.mlp.hook_post"
    stats = T.SAETrainStats(scale=1.5, mse=[0.5, 0.25], l0=[3.0, 2.0], loss=[1.0, 0.5], resampled={10: 2})
    sae = T.new_sae(4, 8, hook_name=hook, model_name="toy-stories", context_size=16)
    return {hook: {"sae": S.sae_to_dict(sae), "stats": dataclasses.asdict(stats)}}


CACHED_VALUES = {  # every kind of value the notebooks and helpers cache (name of the entries in the comment)
    "float tensor": lambda: torch.randn(4, 2, 5),                       # arith-ie-maps, arith-probes, arith-neuron-attr
    "half tensor": lambda: torch.rand(2, 4, 3, 3, 5).half(),            # arith-attn-grid
    "k/kv maps and scores": lambda: (torch.randn(2, 9), torch.randn(2, 9), heuristic_scores()),  # arith-kv-maps
    "saes": sae_entry,                                                  # sae
    "builtins": lambda: {"float": 0.5, "int": 3, "text": "a", "none": None, "flag": True,
                         "nested": [(1, 2.0), {"weights": torch.ones(2, dtype=torch.float64)}]},
}


def assert_same(got, expected):
    assert type(got) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    elif dataclasses.is_dataclass(expected):
        for field in dataclasses.fields(expected):
            assert_same(getattr(got, field.name), getattr(expected, field.name))
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            assert_same(got[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for item, expected_item in zip(got, expected):
            assert_same(item, expected_item)
    else:
        assert got == expected


@pytest.mark.parametrize("kind", list(CACHED_VALUES))
def test_every_kind_of_cached_value_round_trips(tmp_path, kind):
    value = CACHED_VALUES[kind]()
    cache.write(tmp_path / "entry.pt", value)
    assert_same(cache.read(tmp_path / "entry.pt"), value)


@dataclasses.dataclass
class NotAllowListed:
    x: int = 1


class RunsAShellCommand:
    """Unpickling this calls `os.system`: what a crafted pickle does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def forge(path, value):
    """A cache file holding `value` with a valid header and checksum, as `write` would make if it did not refuse it."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payload = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cache._MAGIC + hashlib.sha256(payload).digest() + payload)


def test_a_forged_entry_is_refused_and_recomputed_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = cache.cache_path("thing", "key", tmp_path)
    forge(path, {"value": RunsAShellCommand(marker)})
    with pytest.raises(ValueError, match="system"):
        cache.read(path)
    with pytest.warns(cache.CacheWarning, match="recomputing"):
        assert cache.cached("thing", "key", lambda: 7, cache_dir=tmp_path) == 7
    assert not marker.exists() and cache.read(path) == 7


def test_a_class_that_is_not_allow_listed_is_refused_on_read_and_write(tmp_path):
    path = cache.cache_path("thing", "key", tmp_path)
    forge(path, [NotAllowListed()])
    with pytest.raises(ValueError, match="NotAllowListed"):
        cache.read(path)
    with pytest.raises(TypeError, match="NotAllowListed"):
        cache.write(tmp_path / "other.pt", [NotAllowListed()])
    assert not (tmp_path / "other.pt").exists()
    with pytest.warns(cache.CacheWarning, match="could not store .*NotAllowListed"):
        assert cache.cached("thing", "key", lambda: [NotAllowListed(2)], cache_dir=tmp_path) == [NotAllowListed(2)]
