"""The syllogism task: deterministic prompts, one layout per batch, answers where the template says; the toy model."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from helpers.tasks import syllogisms as task


def test_generator_is_deterministic_and_pairs_flip():
    a = task.make_syllogisms(n=50, seed=3)
    b = task.make_syllogisms(n=50, seed=3)
    assert [x.text for x in a] == [x.text for x in b]
    assert [x.text for x in a] != [x.text for x in task.make_syllogisms(n=50, seed=4)]
    assert a[1] == a[0].flipped
    assert a[0].text.startswith("All ") and a[0].text.endswith(" are")
    assert len(task.make_syllogisms()) == 2 * len(task.CATEGORIES) * len(task.DESCRIPTOR_PAIRS) * len(task.NOUNS)
    assert len(set(task.NOUNS)) == len(task.NOUNS)


def test_slot_spans_point_at_the_words():
    item = task.Syllogism("birds", "nocturnal", "diurnal", "Owls")
    text = item.text
    for slot, word in [("category", "birds"), ("A", "nocturnal"), ("B", "diurnal"), ("Noun", "Owls"),
                       ("category2", "birds"), ("noun", "owls")]:
        start, end = item.slot_spans()[slot]
        assert text[start:end].strip() == word


def test_dataset_layout_with_a_bpe_tokenizer(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("gpt_neox"))
    data = task.build_dataset(tokenizer, task.make_syllogisms(n=200, seed=0))
    assert len(data) > 0 and data.clean_tokens.shape == data.corrupted_tokens.shape
    pos = data.positions
    assert data.clean_tokens[0, 0].item() == tokenizer.bos_token_id
    assert torch.equal(data.clean_tokens[:, pos["A"]], data.answers[:, 0])
    assert torch.equal(data.clean_tokens[:, pos["B"]], data.answers[:, 1])
    assert torch.equal(data.corrupted_tokens[:, pos["A"]], data.answers[:, 1])
    assert torch.all(data.answers[:, 0] != data.answers[:, 1])
    assert pos["final"] == data.clean_tokens.shape[1] - 1
    assert tokenizer.decode(data.clean_tokens[0, pos["final"]]).strip() == "are"
    assert tokenizer.decode(data.clean_tokens[0, pos["not"]:pos["not"] + 3]).strip().startswith("n")


@pytest.fixture(scope="module")
def toy():
    from helpers.models import load_model
    from helpers.zoo import checkpoint_dir

    if not (checkpoint_dir("toy-syllogism") / "config.json").is_file():
        pytest.skip("toy-syllogism checkpoint not built")
    return load_model("toy-syllogism", device="cpu")


def test_toy_layout_matches_pythia_shape(toy):
    data = task.build_dataset(toy.tokenizer, task.make_syllogisms(n=64, seed=0))
    assert len(data) == 64  # every prompt has the toy's fixed 3-piece descriptors
    assert (data.positions["A"], data.positions["B"], data.positions["final"]) == (4, 9, 20)


def test_toy_heldout_accuracy(toy):
    from helpers.toys.syllogism import HELD_OUT_CATEGORIES, HELD_OUT_NOUNS

    items = task.make_syllogisms(HELD_OUT_CATEGORIES, task.DESCRIPTOR_PAIRS, HELD_OUT_NOUNS)
    data = task.sample_pairs(task.build_dataset(toy.tokenizer, items), 128, seed=1)
    with torch.no_grad():
        accuracy = task.accuracy(toy, data)
    assert accuracy["top1"] >= 0.95
    diffs = task.logit_diffs(toy, data.clean_tokens, data.answers)
    kept, rate = task.filter_by_logit_diff(toy, data, threshold=0.0)
    assert rate == pytest.approx(((diffs > 0) & (task.logit_diffs(toy, data.corrupted_tokens, data.answers) < 0))
                                 .float().mean().item())
    assert len(kept) == round(rate * len(data))
