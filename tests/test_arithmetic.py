"""Arithmetic prompts (helpers.tasks.arithmetic) and the toy-arithmetic tokenizer."""
from __future__ import annotations

import pytest
import torch

from helpers.tasks import arithmetic as task


@pytest.mark.parametrize("max_op, expected", [
    (300, {"+": 90_000, "-": 45_150, "*": 5_784, "/": 89_401}),
    (50, {"+": 2_500, "-": 1_275, "*": 1_946, "/": 2_401}),
    (150, {"+": 22_500, "-": 11_325, "*": 4_250, "/": 22_201}),
])
def test_golden_prompt_counts(max_op, expected):
    assert task.prompt_counts(max_op, 999) == expected


def test_prompts_are_valid_and_use_integer_division():
    for op in task.OPERATORS:
        prompts = task.all_prompts(op, max_op=60, max_single_token=999)
        assert len(prompts) > 0
        assert ((prompts.results >= 0) & (prompts.results <= 999)).all()
        for x, y, r in list(zip(prompts.x.tolist(), prompts.y.tolist(), prompts.results.tolist()))[::97]:
            assert task.apply(op, x, y) == r
            assert task.parse_prompt(task.prompt_text(x, op, y)) == (x, op, y)
    div = task.all_prompts("/", max_op=300)
    assert div.y.min() >= 1 and div.x.min() >= 1
    assert task.apply("/", 45, 4) == 11
    assert abs(float((div.results == 0).float().mean()) - 0.498) < 0.01  # "half of the legal prompts result in 0"


def test_results_respect_single_token_limit():
    mul = task.all_prompts("*", max_op=300, max_single_token=999)
    assert int(mul.results.max()) <= 999
    # every pair with a product <= 999 is there, none beyond
    grid = task.grid_prompts("*", 0, 300)
    assert int(((grid.results >= 0) & (grid.results <= 999)).sum()) == len(mul)
    add = task.all_prompts("+", max_op=600, max_single_token=999)
    assert int(add.results.max()) == 999


def test_split_is_seeded_and_disjoint():
    prompts = task.all_prompts("+", max_op=40)
    a_train, a_test = task.split_train_test(prompts, 0.2, seed=3)
    b_train, b_test = task.split_train_test(prompts, 0.2, seed=3)
    assert torch.equal(a_test.pairs, b_test.pairs)
    assert len(a_train) + len(a_test) == len(prompts)
    train_set = {tuple(p) for p in a_train.pairs.tolist()}
    assert not train_set & {tuple(p) for p in a_test.pairs.tolist()}


def test_corrupt_partners_differ_in_answer():
    clean = task.all_prompts("+", max_op=30).sample(50, seed=0)
    pool = [task.all_prompts(op, max_op=30).sample(50, seed=i) for i, op in enumerate(task.OPERATORS)]
    ops, pairs, results = task.corrupt_partners(clean, pool, seed=1)
    assert len(ops) == len(clean)
    assert (results != clean.results).all()
    for op, (x, y), r in zip(ops, pairs.tolist(), results.tolist()):
        assert task.apply(op, x, y) == r


def test_mean_ablation_prompts_cover_all_operators_including_undefined():
    sets = task.mean_ablation_prompts(20, None, seed=0)
    assert [s.op for s in sets] == list(task.OPERATORS)
    assert all(len(s) == 400 for s in sets)
    assert (sets[3].results == -1).sum() == 20  # x/0
    assert (sets[1].results == -1).sum() == 190  # negative differences


def test_toy_tokenizer_numbers_are_single_tokens(tmp_path):
    from helpers.models.recipes.arithmetic import build_tokenizer

    tokenizer = build_tokenizer()
    assert task.max_single_token_number(tokenizer) == 999
    ids = task.number_token_ids(tokenizer, 999)
    assert len(set(ids.tolist())) == 1000
    encoded = tokenizer("123+45=")["input_ids"]
    assert encoded[0] == tokenizer.bos_token_id and len(encoded) == 5
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "123+45="
    assert tokenizer.convert_ids_to_tokens(tokenizer("1234*5=", add_special_tokens=False)["input_ids"]) == \
        ["123", "4", "*", "5", "="]  # Llama-3's rule: digits in runs of at most three
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("999/7=")["input_ids"] == tokenizer("999/7=")["input_ids"]
    prompts = task.all_prompts("-", max_op=20)
    tokens = task.prompt_tokens(reloaded, prompts)
    assert tokens.shape == (len(prompts), 5)
    assert (tokens[:, 0] == reloaded.bos_token_id).all()


def test_toy_tokenizer_through_the_bridge(tmp_path):
    from helpers.models.load import load_model
    from helpers.models.recipes.arithmetic import build_model, build_tokenizer
    from helpers.models.zoo import save_hf_checkpoint

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2)
    save_hf_checkpoint(model, tokenizer, tmp_path / "tiny")
    bridge = load_model(tmp_path / "tiny", device="cpu")
    assert bridge.to_str_tokens("12+345=") == ["<|begin_of_text|>", "12", "+", "345", "="]
    prompts = task.all_prompts("*", max_op=15)
    tokens = task.prompt_tokens(tokenizer, prompts)
    assert torch.equal(bridge.to_tokens(prompts.texts[0])[0].cpu(), tokens[0])
    predictions = task.predict_numbers(bridge, tokenizer, prompts)
    assert predictions.shape == (len(prompts),)
    correct, wrong = task.split_by_correctness(bridge, tokenizer, prompts)
    assert len(correct) + len(wrong) <= len(prompts)
    assert (correct.predictions == correct.results).all()
    assert (wrong.predictions != wrong.results).all() and (wrong.predictions >= 0).all()


def test_head_penalty_is_a_group_lasso_over_heads():
    from helpers.models.recipes import arithmetic as recipe

    tokenizer = recipe.build_tokenizer()
    model = recipe.build_model(tokenizer, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    attn = model.model.layers[1].self_attn
    d_head = 32 // 4
    with torch.no_grad():
        before = float(recipe.head_group_norms(model))
        o_block = attn.o_proj.weight[:, :d_head].norm()
        v_block = attn.v_proj.weight[:d_head].norm()
        attn.o_proj.weight[:, :d_head] = 0          # head 0 of layer 1 switched off ...
        attn.v_proj.weight[:d_head] = 0             # ... with its key/value group (heads 0 and 1)
        after = float(recipe.head_group_norms(model))
    assert after == pytest.approx(before - float(o_block) - float(v_block), rel=1e-5)
    batch = (torch.tensor([[0, 5, 1003, 7, 1007]]), torch.tensor([9]))           # 2+4= -> 6
    plain = float(recipe.make_loss(0.0)(model, batch))
    assert float(recipe.make_loss(0.1)(model, batch)) == pytest.approx(plain + 0.1 * after, rel=1e-5)


def test_discovery_and_evaluation_prompts_are_disjoint_and_seeded():
    prompts = task.all_prompts("+", max_op=20)
    discovery, evaluation = task.split_discovery_evaluation(prompts, 30, 40, split_seed=1, eval_seed=2)
    assert len(discovery) == 30 and len(evaluation) == 40
    assert not set(discovery.texts) & set(evaluation.texts)
    again, _ = task.split_discovery_evaluation(prompts, 30, 40, split_seed=1, eval_seed=2)
    assert again.texts == discovery.texts
    other, _ = task.split_discovery_evaluation(prompts, 30, 40, split_seed=3, eval_seed=2)
    assert other.texts != discovery.texts
    with pytest.raises(ValueError, match="n_discovery"):
        task.split_discovery_evaluation(prompts, 300, 200, 0, 0)


def test_a_tokenizer_that_splits_numbers_into_digits_is_refused_naming_the_property():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<s>", *"0123456789", "+", "-", "=", "*", "/"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")   # every character its own token
    digits = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
    with pytest.raises(ValueError, match=r"keeps numbers whole only up to 9 \('10' -> \['1', '0'\]: it splits "
                                         r"numbers into digits\).*max_single_token=9 and max_op=10"):
        task.check_single_token_numbers(digits, 999)
    task.check_single_token_numbers(digits, 9)
