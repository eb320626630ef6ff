"""load_model on tiny GPT-NeoX (Pythia), Llama and GPT-Neo (TinyStories) checkpoints saved to disk."""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.models import load, zoo
from helpers.core.hub import HubUnreachableError
from helpers.models.load import load_model
from helpers.models.source import ModelNotFoundError, resolve_model
from tests.conftest import ARCHITECTURES, build_tiny_checkpoint

HOOKS = ["blocks.{L}.mlp.hook_post", "blocks.{L}.mlp.hook_pre", "blocks.{L}.attn.hook_z",
         "blocks.{L}.attn.hook_pattern", "blocks.{L}.hook_resid_pre", "blocks.{L}.hook_resid_post",
         "blocks.{L}.hook_attn_out", "blocks.{L}.hook_mlp_out", "ln_final.hook_scale"]
TEXT = "All cats are red, not blue. Das ist ein Test."


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_hook_names_exist_with_expected_shapes(tiny_checkpoint, architecture):
    model = load_model(tiny_checkpoint(architecture), device="cpu")
    tokens = model.to_tokens(TEXT)
    _, cache = model.run_with_cache(tokens)
    cfg = model.cfg
    for layer in range(cfg.n_layers):
        for template in HOOKS:
            assert template.format(L=layer) in cache, template.format(L=layer)
        assert cache[f"blocks.{layer}.attn.hook_z"].shape == (1, tokens.shape[1], cfg.n_heads, cfg.d_head)
        assert cache[f"blocks.{layer}.attn.hook_pattern"].shape == (1, cfg.n_heads, tokens.shape[1], tokens.shape[1])
        assert cache[f"blocks.{layer}.mlp.hook_post"].shape == (1, tokens.shape[1], cfg.d_mlp)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("process_weights", [True, False])
def test_log_probs_match_raw_hugging_face_model(tiny_checkpoint, architecture, process_weights):
    folder = tiny_checkpoint(architecture)
    model = load_model(folder, device="cpu", process_weights=process_weights)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tokens = model.to_tokens(TEXT)
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        theirs = hf_model(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_square_mlp_model_keeps_its_predictions(tmp_path):
    # transformer-lens 3.9 mis-processes GPT-NeoX weights when d_mlp == d_model; load_model must notice and fall back
    folder = build_tiny_checkpoint("gpt_neox", tmp_path / "square", d_model=32, d_mlp=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(folder, device="cpu")
    hf_model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tokens = model.to_tokens(TEXT)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).log_softmax(-1), hf_model(tokens).logits.log_softmax(-1),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_str_tokens_round_trip(tiny_checkpoint, architecture):
    model = load_model(tiny_checkpoint(architecture), device="cpu")
    pieces = model.to_str_tokens(TEXT, prepend_bos=False)
    assert "".join(pieces) == TEXT
    assert len(pieces) == model.to_tokens(TEXT, prepend_bos=False).shape[1]


def test_processing_options_change_weights_not_predictions(tiny_checkpoint):
    folder = tiny_checkpoint("gpt_neox")
    folded = load_model(folder, device="cpu")
    unfolded = load_model(folder, device="cpu", fold_ln=False, center_writing_weights=False, center_unembed=False)
    assert not torch.allclose(folded.W_U, unfolded.W_U)
    tokens = folded.to_tokens(TEXT)
    torch.testing.assert_close(folded(tokens).log_softmax(-1), unfolded(tokens).log_softmax(-1), atol=1e-4, rtol=0)


def test_unknown_zoo_name_lists_the_zoo(monkeypatch):
    monkeypatch.setattr(zoo, "ZOO", {"toy-example": zoo.ZooModel("toy-example", "GPTNeoXForCausalLM", "x", "y", "z")})
    with pytest.raises(ModelNotFoundError, match="toy-example"):
        load_model("toy-does-not-exist")


def test_hub_name_while_offline_says_so():
    with pytest.raises(HubUnreachableError, match="offline"):
        load_model("EleutherAI/pythia-70m")


def test_hub_failure_is_reported_as_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(load.TransformerBridge, "boot_transformers", unreachable)
    with pytest.raises(HubUnreachableError, match="could not load .* from the Hugging Face hub.*offline"):
        load_model("EleutherAI/pythia-70m", device="cpu")


def test_zoo_model_without_checkpoint_names_the_retrain_command(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "ZOO", {"toy-missing": zoo.ZooModel("toy-missing", "GPTNeoXForCausalLM", "x", "y", "z")})
    monkeypatch.setattr(zoo, "MODELS_DIR", tmp_path)
    with pytest.raises(ModelNotFoundError, match="python -m helpers.models.zoo train toy-missing"):
        load_model("toy-missing")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_device_and_dtype_resolution():
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert load.resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load.resolve_device("cuda")
    assert load.resolve_dtype("bf16") is torch.bfloat16
    assert load.resolve_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        load.resolve_dtype("float7")
    for unusable in ("float8_e4m3fn", torch.int8):
        with pytest.raises(ValueError, match="cannot hold a model's weights"):
            load.resolve_dtype(unusable)


def test_native_model_is_seeded():
    config = zoo.grokking_transformer_config(d_vocab=6, d_vocab_out=5)
    first, second = (load.build_native_model(config, seed=3, device="cpu") for _ in range(2))
    other = load.build_native_model(config, seed=4, device="cpu")
    tokens = torch.tensor([[0, 1, 5], [2, 3, 5]])
    assert torch.equal(first(tokens), second(tokens))
    assert not torch.equal(first(tokens), other(tokens))


def test_missing_folder_is_named_not_sent_to_the_hub():
    with pytest.raises(ModelNotFoundError, match="no checkpoint folder at '/nonexistent/folder'"):
        load_model("/nonexistent/folder")


def test_non_causal_checkpoint_is_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(load.UnsupportedCheckpointError, match="BertForMaskedLM, not a causal language model"):
        load_model(tmp_path, device="cpu")


def test_truncated_weights_file_is_named(tiny_checkpoint, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_checkpoint("gpt_neox"), tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(load.UnsupportedCheckpointError, match="model.safetensors is unreadable"):
        load_model(folder, device="cpu")


def test_checkpoint_missing_weights_is_refused_with_the_keys(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "partial")
    weights = load_file(folder / "model.safetensors")
    dropped = "model.layers.1.mlp.down_proj.weight"
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(load.UnsupportedCheckpointError, match=f"would stay random: {dropped}"):
        load_model(folder, device="cpu")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bos_follows_the_tokenizer_of_a_model_no_paper_used(tiny_checkpoint, architecture):
    model = load_model(tiny_checkpoint(architecture), device="cpu")
    adds_bos = architecture == "llama"  # the tiny Llama's tokenizer adds BOS, as Llama-3's does; the others add none
    assert model.cfg.default_prepend_bos is adds_bos
    assert bool(model.to_tokens(TEXT)[0, 0] == model.tokenizer.bos_token_id) is adds_bos
    assert model.to_tokens(TEXT).shape[1] == len(model.tokenizer(TEXT, add_special_tokens=False)["input_ids"]) + adds_bos


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_prepend_bos_overrides_the_default(tiny_checkpoint, architecture):
    for wanted in (True, False):
        model = load_model(tiny_checkpoint(architecture), device="cpu", prepend_bos=wanted)
        assert model.cfg.default_prepend_bos is wanted
        assert bool(model.to_tokens(TEXT)[0, 0] == model.tokenizer.bos_token_id) is wanted


def test_papers_models_and_toys_keep_the_bos_their_figures_assume(tiny_checkpoint):
    from types import SimpleNamespace

    model = load_model(tiny_checkpoint("gpt_neox"), device="cpu")
    assert load.bos_by_default(model, False, zoo_model=True)
    pythia_shaped = SimpleNamespace(tokenizer=model.tokenizer, cfg=SimpleNamespace(
        n_layers=6, d_model=512, n_heads=8, d_mlp=2048, d_vocab=50304),
        original_model=SimpleNamespace(config=SimpleNamespace(architectures=["GPTNeoXForCausalLM"])))
    assert load.bos_by_default(pythia_shaped, False)  # HookedTransformer prepended BOS for the papers' figures
    assert not load.bos_by_default(model, False)
    assert load.bos_by_default(model, True)


def test_reference_model_is_chosen_by_shape_not_by_name(tiny_checkpoint):
    from types import SimpleNamespace

    def fake(architecture, n_layers, d_model, n_heads, d_mlp, d_vocab):
        config = SimpleNamespace(architectures=[architecture])
        return SimpleNamespace(cfg=SimpleNamespace(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp,
                                                   d_vocab=d_vocab), original_model=SimpleNamespace(config=config))

    assert load.reference_model(fake("GPTNeoXForCausalLM", 6, 512, 8, 2048, 50304)) == "EleutherAI/pythia-70m"
    assert load.reference_model(fake("GPTNeoXForCausalLM", 6, 512, 8, 2048, 50000)) is None
    assert load.reference_model(fake("LlamaForCausalLM", 6, 512, 8, 2048, 50304)) is None
    toy = load_model(tiny_checkpoint("gpt_neox"), device="cpu")
    assert load.reference_model(toy) is None
    assert load.reference_model(toy, reference="EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"


def test_a_name_resolves_once_into_what_it_is_where_its_files_are_and_its_checkpoints(tiny_checkpoint, monkeypatch):
    by_name, by_folder = resolve_model("toy-bilingual"), resolve_model(zoo.checkpoint_dir("toy-bilingual"))
    assert by_name.is_toy and by_folder.is_toy and by_name.path == by_folder.path == zoo.checkpoint_dir("toy-bilingual")
    assert by_name.toy == by_folder.toy == "toy-bilingual" and resolve_model("toy-stories").toy == "toy-stories"
    assert by_name.revisions == tuple(zoo.revisions("toy-bilingual")) and len(by_name.revisions) > 2
    assert by_name.weight_files("step0") == sorted(zoo.revision_dir("toy-bilingual", "step0").glob("*.safetensors"))
    local = resolve_model(tiny_checkpoint("gpt_neox"))
    assert (local.kind, local.is_toy, local.toy, local.revisions) == ("local", False, None, ())
    assert local.weight_files() == [local.path / "model.safetensors"]
    trained = resolve_model("smollm2-135m-instruct")
    assert trained.kind == "trained" and trained.path.suffix == ".gguf" and not trained.is_toy
    assert resolve_model(local) is local
    for switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(switch, raising=False)  # resolving a hub id reads no network
    pythia, other = resolve_model("EleutherAI/pythia-70m"), resolve_model("meta-llama/Meta-Llama-3-8B")
    assert (pythia.kind, pythia.path, len(pythia.revisions)) == ("hub", None, 154) and other.revisions == ()
    assert pythia.weight_files("step0") == [] and not pythia.is_local


def test_resolving_a_toy_reads_and_never_writes(tmp_path, monkeypatch):
    before = sorted((path, path.stat().st_mtime_ns) for path in zoo.MODELS_DIR.rglob("*"))
    for name in zoo.names():
        resolve_model(name)
    assert sorted((path, path.stat().st_mtime_ns) for path in zoo.MODELS_DIR.rglob("*")) == before


def test_loading_shows_no_weight_progress_bar_and_restores_the_bar_settings(tiny_checkpoint, capfd):
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    load_model(tiny_checkpoint("gpt2"), device="cpu")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out  # the bar a saved notebook shows frozen at 0%
    assert hf_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
    with load.weight_loading_bars_silenced():
        assert not hf_logging.is_progress_bar_enabled()
        assert not hub_utils.are_progress_bars_disabled()  # downloads keep their progress bar


def test_weight_loading_bar_would_show_without_the_silencer(tiny_checkpoint, capfd):
    capfd.readouterr()
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint("gpt2"))
    captured = capfd.readouterr()
    assert "Loading weights" in captured.err  # the planted case: transformers prints it by default
