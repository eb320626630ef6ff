"""Walking training checkpoints: a planted German neuron that appears at a known step is reported at that step; the
walk caches per checkpoint; bars are read off as the first step from which they hold; the zoo's revisions load."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.studies import context_neuron
from helpers.models import training_walk
from helpers.models.source import PYTHIA_REVISIONS, ModelSource, resolve_model
from helpers.models.zoo import revisions as zoo_revisions
from helpers.models.training_walk import first_lasting_crossing, largest_jump_share, revision_step
from tests.conftest import TOKENIZER_TEXTS

STEPS = (0, 10, 20, 40, 80, 160)
GERMAN_IDS = range(10, 110)
ENGLISH_IDS = range(110, 210)
PLANTED = (0, 3)  # layer 0, neuron 3


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def planted_sequence(folder, appears_at: int) -> dict[str, str]:
    """Checkpoints of one tiny GPT-NeoX at `STEPS`: from `appears_at` on, the embedding carries the language on
    coordinate 0 and neuron L0N3 reads it (on for German tokens, off for English ones); before, neither."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from helpers.models.zoo import save_hf_checkpoint, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(TOKENIZER_TEXTS, 256)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, rotary_pct=0.25, use_parallel_residual=True,
                           max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    folders = {}
    for step in STEPS:
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(config).eval()
        embed = model.gpt_neox.embed_in.weight
        embed[:, 0] = 0.0
        if step >= appears_at:
            embed[list(GERMAN_IDS), 0] = 5.0
            embed[list(ENGLISH_IDS), 0] = -5.0
            layer, neuron = PLANTED
            mlp_in = model.gpt_neox.layers[layer].mlp.dense_h_to_4h
            mlp_in.weight[neuron] = 0.0
            mlp_in.weight[neuron, 0] = 2.0
            mlp_in.bias[neuron] = 0.0
        folders[f"step{step}"] = str(save_hf_checkpoint(model, tokenizer, folder / f"step{step}"))
    return folders


def planted_documents() -> tuple[context_neuron.Documents, context_neuron.Documents]:
    generator = torch.Generator().manual_seed(1)
    made = []
    for ids in (GERMAN_IDS, ENGLISH_IDS):
        tokens = torch.tensor(list(ids))[torch.randint(len(ids), (12, 16), generator=generator)]
        tokens[:, 0] = 0
        made.append(context_neuron.Documents.from_tokens(tokens, torch.ones_like(tokens, dtype=torch.bool), 2, 6))
    return made[0], made[1]


def tracked_planted(german, english, d_vocab: int) -> context_neuron.TrackedCircuit:
    german_top, english_top = context_neuron.language_unigrams(german, english, d_vocab, 20, [0])
    return context_neuron.TrackedCircuit(PLANTED, (1, 5), german.tokens[[2, 5]], ((0, 4), (1, 6), (1, 2)),
                                         tuple(german_top.tolist()), tuple(english_top.tolist()))


@pytest.mark.parametrize("appears_at", [20, 80])
def test_the_walk_reports_the_step_at_which_a_planted_neuron_appears(tmp_path, appears_at):
    from helpers.models.load import load_model

    folders = planted_sequence(tmp_path / "checkpoints", appears_at)
    german, english = planted_documents()
    model = load_model(folders["step0"], device="cpu")
    tracked = tracked_planted(german, english, model.cfg.d_vocab)
    loaded = []

    def load(source, revision):
        loaded.append(revision)
        return load_model(folders[revision], device="cpu")

    def measure(model, revision):
        return context_neuron.checkpoint_measurement(model, german, english, tracked, bins=64)

    planted = ModelSource("planted", "local", Path(folders["step0"]))
    walk = training_walk.walk_training(planted, list(folders), measure, key={"appears_at": appears_at}, load=load,
                                       cache_dir=tmp_path / "cache", progress=False)
    assert walk.steps == list(STEPS) and loaded == list(folders)
    f1 = walk.values("context_f1")
    assert all(value < context_neuron.DETECTOR_F1_BAR for value, step in zip(f1, STEPS) if step < appears_at)
    assert all(value > 0.99 for value, step in zip(f1, STEPS) if step >= appears_at)
    timeline = context_neuron.training_timeline(walk.steps, walk.measurements, "L0N3")
    assert timeline.detector == appears_at
    for m in walk.measurements:
        assert m["best_f1"] >= m["context_f1"] - 1e-6 and m["best_f1"] >= m["runner_up_f1"]
        assert m["ngram_off"] == pytest.approx(m["ngram_on"] * (1 - m["dependence"])) or m["ngram_on"] <= 0

    def refuse(source, revision):
        raise AssertionError("a cached checkpoint was loaded again")

    again = training_walk.walk_training(planted, list(folders), measure, key={"appears_at": appears_at},
                                        load=refuse, cache_dir=tmp_path / "cache", progress=False)
    assert again.measurements == walk.measurements


def _measurements(context_f1, dependence, best=None):
    return [{"best": (best or ["L1N2"] * len(context_f1))[i], "context_f1": f, "german_change": 10.0,
             "english_change": 0.1, "boost_de": 1.0, "boost_en": 0.5, "dependence": d}
            for i, (f, d) in enumerate(zip(context_f1, dependence))]


def test_the_timeline_tells_a_gradual_combination_from_a_sudden_one():
    steps = [0, 10, 100, 1000, 10000]
    gradual = context_neuron.training_timeline(
        steps, _measurements([0.5, 0.96, 0.97, 0.98, 0.99], [0.0, 0.1, 0.3, 0.55, 0.8]), "L1N2")
    assert gradual.detector == 10 and gradual.dependence == 1000
    assert gradual.detector_first and gradual.gradual
    assert gradual.largest_jump_share == pytest.approx(0.25 / 0.8)
    sudden = context_neuron.training_timeline(
        steps, _measurements([0.5, 0.6, 0.7, 0.96, 0.99], [0.0, 0.0, 0.9, 0.9, 0.9]), "L1N2")
    assert sudden.dependence == 100 and sudden.detector == 1000
    assert sudden.detector_first is False and sudden.gradual is False


def test_a_bar_that_is_lost_again_only_counts_from_where_it_lasts():
    steps = [0, 1, 2, 3, 4]
    assert first_lasting_crossing(steps, [0, 1, 0, 1, 1], 0.5) == 3
    assert first_lasting_crossing(steps, [1, 1, 1, 1, 0], 0.5) is None
    assert first_lasting_crossing(steps, [1, 1, 1, 1, 1], 0.5) == 0
    assert first_lasting_crossing(steps, [5, 4, 1, 0, 0], 1, above=False) == 2
    assert largest_jump_share([0.0, 1.0, 1.0]) == 1.0
    assert largest_jump_share([1.0, 0.5, 0.2]) != largest_jump_share([1.0, 0.5, 0.2])  # NaN: it never rose


def test_revisions_name_steps_and_pythia_has_154():
    assert revision_step("step143000") == 143000
    with pytest.raises(ValueError, match="main"):
        revision_step("main")
    assert len(training_walk.PYTHIA_REVISIONS) == 154 and training_walk.PYTHIA_REVISIONS[:3] == ("step0", "step1", "step2")
    chosen = training_walk.pythia_revisions(12)
    assert chosen[0] == "step0" and chosen[-1] == "step143000" and len(chosen) == 12
    assert set(chosen) <= set(training_walk.PYTHIA_REVISIONS)
    assert training_walk.default_revisions(resolve_model("toy-bilingual")) == zoo_revisions("toy-bilingual")
    assert training_walk.default_revisions(ModelSource("EleutherAI/pythia-70m", "hub", None, PYTHIA_REVISIONS)) == chosen
    assert training_walk.default_revisions(ModelSource("gpt2", "hub", None)) == []
    with pytest.raises(ValueError, match="training order"):
        training_walk.walk_training("toy-bilingual", ["step100", "step20"], lambda m, r: {}, key={})


def test_the_toy_ships_its_training_checkpoints_and_loads_them_by_revision():
    from helpers.models import zoo
    from helpers.models.load import load_model

    revisions = zoo.revisions("toy-bilingual")
    steps = [revision_step(r) for r in revisions]
    assert len(revisions) == 20 and steps[0] == 0 and steps == sorted(steps)
    assert zoo.revision_dir("toy-bilingual", revisions[-1]) == zoo.checkpoint_dir("toy-bilingual")
    with pytest.raises(ValueError, match="step5.*ships: step0, step20"):
        zoo.revision_dir("toy-bilingual", "step5")
    tokens = torch.tensor([[0, 5, 9, 17]])
    first, final = (load_model("toy-bilingual", device="cpu", revision=r) for r in (revisions[0], revisions[-1]))
    default = load_model("toy-bilingual", device="cpu")
    assert torch.equal(final(tokens), default(tokens))
    assert not torch.allclose(first(tokens), final(tokens))


def test_the_tracked_n_gram_positions_follow_their_documents():
    from helpers.studies.ngrams import NgramTest

    tokens = torch.arange(40).reshape(5, 8)
    german = context_neuron.Documents.from_tokens(tokens, torch.ones_like(tokens, dtype=torch.bool), 1, 2)
    test = NgramTest(2, 7, 0.5, " wort", [(3, 4), (1, 2), (3, 6)], on=1.0, off=0.1, english=0.0, shift_loss=0.2,
                     diff=torch.zeros(5, 7))
    tracked = context_neuron.TrackedCircuit.of_final_model((1, 4), test, german, [3, 1], [2])
    assert tracked.ngram == (2, 7) and tracked.german_unigrams == (3, 1)
    assert torch.equal(tracked.ngram_tokens, tokens[[1, 3]])
    assert [int(tracked.ngram_tokens[row, pos]) for row, pos in tracked.ngram_positions] == [28, 10, 30]
    untracked = context_neuron.TrackedCircuit.of_final_model((1, 4), None, german, [3], [2])
    assert untracked.ngram is None and untracked.ngram_positions == ()
