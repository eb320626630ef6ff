"""The syllogism task: deterministic prompts, one layout per batch, answers where the template says; the toy model."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from helpers.models.load import load_model
from helpers.tasks import syllogisms as task
from tests.conftest import ARCHITECTURES


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
    from helpers.models.load import load_model
    from helpers.models.zoo import checkpoint_dir

    if not (checkpoint_dir("toy-syllogism") / "config.json").is_file():
        pytest.skip("toy-syllogism checkpoint not built")
    return load_model("toy-syllogism", device="cpu")


def test_toy_layout_matches_pythia_shape(toy):
    data = task.build_dataset(toy.tokenizer, task.make_syllogisms(n=64, seed=0))
    assert len(data) == 64  # every prompt has the toy's fixed 3-piece descriptors
    assert (data.positions["A"], data.positions["B"], data.positions["final"]) == (4, 9, 20)


def test_toy_heldout_accuracy(toy):
    from helpers.models.recipes.syllogism import HELD_OUT_CATEGORIES, HELD_OUT_NOUNS

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
    unfiltered, rate = task.filter_by_logit_diff(toy, data, threshold=None)
    assert rate == 1.0 and len(unfiltered) == len(data)


def test_sample_pairs_keeps_both_orders_of_each_pair(toy):
    pool = task.build_dataset(toy.tokenizer, task.make_syllogisms(n=400, seed=0))
    odd_one_out = pool.subset([i for i in range(len(pool)) if i != 1])  # prompt 0 has lost its flip
    data = task.sample_pairs(odd_one_out, 40, seed=2)
    assert len(data) == 40 and odd_one_out.items[0] not in data.items
    assert len({item.text for item in data.items}) == 40
    for k in range(0, 40, 2):
        assert data.items[k + 1] == data.items[k].flipped
        assert torch.equal(data.corrupted_tokens[k], data.clean_tokens[k + 1])
        assert torch.equal(data.answers[k + 1], data.answers[k].flip(0))
    # every answer token is the correct answer exactly as often as it is the distractor
    assert torch.equal(data.answers[:, 0].sort().values, data.answers[:, 1].sort().values)
    assert [x.text for x in task.sample_pairs(odd_one_out, 40, seed=2).items] == [x.text for x in data.items]
    assert [x.text for x in task.sample_pairs(odd_one_out, 40, seed=3).items] != [x.text for x in data.items]
    with pytest.raises(ValueError, match="odd"):
        task.sample_pairs(pool, 7)
    with pytest.raises(ValueError, match="flip pairs"):
        task.sample_pairs(pool.subset(range(0, len(pool), 2)), 2)  # one order of every pair: no pair left


def test_sampled_pairs_make_the_corrupted_logit_diff_minus_the_clean_one(toy):
    from helpers.techniques.dla import logit_diff

    model = toy
    pool = task.build_dataset(model.tokenizer, task.make_syllogisms(n=200, seed=0))
    data = task.sample_pairs(pool, 16, seed=0)
    with torch.no_grad():
        clean = logit_diff(model(data.clean_tokens), data.answers).item()
        corrupted = logit_diff(model(data.corrupted_tokens), data.answers).item()
    assert clean != 0 and corrupted == pytest.approx(-clean, abs=1e-4)
    shuffled = pool.subset(torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:16])
    with torch.no_grad():
        unpaired = [logit_diff(model(t), shuffled.answers).item()
                    for t in (shuffled.clean_tokens, shuffled.corrupted_tokens)]
    assert unpaired[1] != pytest.approx(-unpaired[0], abs=1e-4)  # what a random subset of single prompts loses


def test_held_out_pairs_are_disjoint_from_the_analysed_ones(toy):
    pool = task.build_dataset(toy.tokenizer, task.make_syllogisms(n=400, seed=0))
    used = task.sample_pairs(pool, 40, seed=0)
    held_out = task.held_out_pairs(pool, used, 40, seed=0)
    assert len(held_out) == 40 and not set(held_out.items) & set(used.items)
    assert all(held_out.items[k + 1] == held_out.items[k].flipped for k in range(0, 40, 2))
    rest = len(task.flip_pairs(pool)) - 20                  # fewer left than asked: all of them
    assert len(task.held_out_pairs(pool, used, 10 * len(pool), seed=0)) == 2 * rest
    assert task.held_out_pairs(used, used, 40) is None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logit_diffs_and_accuracy_read_the_final_position_of_a_plain_run(tiny_checkpoint, arch):
    """Only the final position is unembedded; the figures are those of the full logits."""
    model = load_model(tiny_checkpoint(arch), device="cpu")
    items = task.make_syllogisms(n=40, seed=0)
    data = task.build_dataset(model.tokenizer, items, prepend_bos=model.cfg.default_prepend_bos)
    with torch.no_grad():
        last = model(data.clean_tokens)[:, -1]
    expected = last.gather(1, data.answers[:, :1]) - last.gather(1, data.answers[:, 1:2])
    torch.testing.assert_close(task.logit_diffs(model, data.clean_tokens, data.answers, batch_size=7),
                               expected.squeeze(1), atol=1e-5, rtol=1e-5)
    top1 = (last.argmax(-1) == data.answers[:, 0]).float().mean().item()
    assert task.accuracy(model, data, batch_size=7)["top1"] == pytest.approx(top1)
