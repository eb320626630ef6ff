"""Sparse autoencoders on model activations: save/load in SAELens's format, collect activations, splice, ablate,
measure.

The SAEs are SAELens `StandardSAE`s (ReLU, `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc`, `b_dec`), so
`sae_lens.SAE.load_from_disk` reads what `save_sae` writes, and published SAELens releases load through the same
`load_sae`. They are trained by `helpers.techniques.sae_training` (our own loop; its docstring says why not
SAELens' `SAETrainer`).

Hooks (`splice_hook`, `feature_ablation_hook`, `replace_hook`) put an SAE's reconstruction, or an ablation of some of
its features, into a forward pass, at every position or at given ones. Measurements at one position per prompt
(`logits_at`, `answer_measures`, `measure_changes`) serve interventions at that position (`at_positions`); `sae_metrics`
measures an SAE's quality on whole sequences. What features do and what drives them is in
`helpers.techniques.sae_features`.

Functions take the model and tensors and return tensors or small dataclasses; nothing prints or plots.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from helpers.core.components import device_of, hooks_on, layers_needed, Model, run_with_hooks, unembed_only_at
from helpers.techniques.losses import token_losses
from helpers.techniques.replay import SuffixReplay

Hook = Callable[[Tensor, object], Tensor]
HooksFor = Callable[[Tensor, Tensor], list]  # (rows, positions of those rows) -> [(hook_name, hook)]


# ----------------------------------------------------------------------------------------------------------------
# SAELens objects, saving and loading
# ----------------------------------------------------------------------------------------------------------------
def sae_to_dict(sae) -> dict:
    """A plain, picklable form of a SAELens SAE: `{"cfg": cfg.to_dict(), "state_dict": {...}}`."""
    return {"cfg": sae.cfg.to_dict(), "state_dict": {k: v.detach().cpu().clone() for k, v in sae.state_dict().items()}}


def sae_from_dict(data: dict, device: str | torch.device = "cpu"):
    """Inverse of `sae_to_dict`."""
    from sae_lens import SAE

    cfg_dict = dict(data["cfg"])
    cfg_dict["device"] = str(device)
    cfg_class = SAE.get_sae_config_class_for_architecture(cfg_dict["architecture"])
    cfg = cfg_class.from_dict(cfg_dict)
    sae = SAE.get_sae_class_for_architecture(cfg.architecture())(cfg)
    sae.load_state_dict(data["state_dict"])
    return sae.to(device)


def save_sae(sae, folder: str | Path) -> Path:
    """Write `sae` in SAELens's on-disk format (`cfg.json` + `sae_weights.safetensors`); `load_sae(folder)` or
    `sae_lens.SAE.load_from_disk(folder)` read it back."""
    folder = Path(folder)
    sae.save_model(folder)
    return folder


def load_sae(source: str | Path, sae_id: str | None = None, *, device: str | torch.device = "cpu"):
    """Load a SAE: a local folder in SAELens format, or a published SAELens release by id.

    Args:
        source: a folder written by `save_sae` / `SAE.save_model`, or a SAELens release name (see
            `sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory()`), e.g.
            `"gpt2-small-res-jb"`.
        sae_id: the SAE inside a release (e.g. `"blocks.8.hook_resid_pre"`); required for releases.
    """
    from sae_lens import SAE

    path = Path(source).expanduser()
    if path.is_dir():
        return SAE.load_from_disk(path, device=str(device))
    if sae_id is None:
        raise ValueError(f"{source!r} is not a local SAE folder; to load a SAELens release pass its sae_id too")
    from helpers.core.hub import HubUnreachableError, hub_offline

    if hub_offline():
        raise HubUnreachableError(
            f"SAELens release {source!r} / {sae_id!r} would be downloaded from the Hugging Face hub, but offline mode "
            "is on (HF_HUB_OFFLINE). Train SAEs locally with helpers.techniques.sae_training.train_saes, or pass a "
            "local SAE folder.")
    try:
        return SAE.from_pretrained(str(source), sae_id, device=str(device))
    except (OSError, ConnectionError, TimeoutError) as error:
        raise HubUnreachableError(
            f"could not download SAELens release {source!r} / {sae_id!r} ({type(error).__name__}: {error})") from error


# ----------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_activations(model: Model, tokens: Int[Tensor, "batch seq"], hook_names: Sequence[str], *,
                        skip_first: int = 1) -> dict[str, Float[Tensor, "tokens d"]]:
    """Activations of `hook_names`, flattened to `[batch * (seq - skip_first), d]` (the first `skip_first`
    positions, i.e. BOS, are left out)."""
    _, cache = model.run_with_cache(tokens.to(device_of(model)), names_filter=list(hook_names),
                                    stop_at_layer=layers_needed(hook_names))
    return {name: cache[name][:, skip_first:].reshape(-1, cache[name].shape[-1]).float() for name in hook_names}


# ----------------------------------------------------------------------------------------------------------------
# Hooks: splice, reconstruct, ablate
# ----------------------------------------------------------------------------------------------------------------
def _select(activation: Float[Tensor, "batch pos d"], positions: Tensor | None) -> Bool[Tensor, "batch pos 1"]:
    """Bool mask `[batch, pos, 1]` of where to intervene; `positions` is a `[batch, pos]` mask or `[batch]` indices."""
    batch, n_pos = activation.shape[:2]
    if positions is None:
        return torch.ones(batch, n_pos, 1, dtype=torch.bool, device=activation.device)
    positions = positions.to(activation.device)
    if positions.dtype == torch.bool:  # [batch or 1, pos]
        return positions[:, :n_pos, None].expand(batch, n_pos, 1)
    mask = torch.zeros(batch, n_pos, dtype=torch.bool, device=activation.device)
    mask[torch.arange(batch, device=activation.device), positions.long()] = True
    return mask[..., None]


def splice_hook(sae, *, positions: Bool[Tensor, "#batch pos"] | Int[Tensor, " batch"] | None = None,
                error_term: bool = False, ablate: Sequence[int] | Int[Tensor, " features"] | None = None) -> Hook:
    """A forward hook that replaces activations `[batch, pos, d_in]` with the SAE's reconstruction.

    Args:
        positions: where to intervene: a bool mask `[batch, pos]` (or `[1, pos]`, the same for every row), indices
            `[batch]` (one position per prompt), or None for every position.
        error_term: add the SAE's error back (`x_hat + (x - x_hat)`): the output equals the input unless features
            are ablated, so `ablate` then removes exactly those features' contributions.
        ablate: feature indices whose activations are set to zero before decoding.
    """
    features = None if ablate is None else torch.as_tensor(ablate, dtype=torch.long)

    def hook(activation: Tensor, hook=None) -> Tensor:
        x = activation.to(sae.W_dec.dtype)
        acts = sae.encode(x)
        ablating = features is not None and len(features) > 0
        if error_term and ablating:  # x - sum_f acts_f W_dec[f]: exactly x where those features are off
            index = features.to(acts.device)
            new = x - acts[..., index] @ sae.W_dec[index]
        elif error_term:  # x_hat + (x - x_hat)
            recon = sae.decode(acts)
            new = recon + (x - recon)
        else:
            if ablating:
                acts = acts.clone()
                acts[..., features.to(acts.device)] = 0.0
            new = sae.decode(acts)
        mask = _select(activation, positions)
        return torch.where(mask, new.to(activation.dtype), activation)

    return hook


def feature_ablation_hook(sae, features: Sequence[int] | Int[Tensor, " features"],
                          positions: Bool[Tensor, "#batch pos"] | Int[Tensor, " batch"] | None = None) -> Hook:
    """Remove the contributions of `features` (`acts[..., f] * W_dec[f]`) and keep the SAE error: the original
    notebook's "ablate the direction" hook, at `positions` (see `splice_hook`)."""
    return splice_hook(sae, positions=positions, error_term=True, ablate=features)


def replace_hook(value: Float[Tensor, " d"] | float,
                 positions: Bool[Tensor, "#batch pos"] | Int[Tensor, " batch"] | None = None) -> Hook:
    """Replace activations with `value` (0 for zero ablation, a `[d]` mean for mean ablation) at `positions`."""

    def hook(activation: Tensor, hook=None) -> Tensor:
        fill = torch.as_tensor(value, dtype=activation.dtype, device=activation.device).expand_as(activation)
        return torch.where(_select(activation, positions), fill, activation)

    return hook


# ----------------------------------------------------------------------------------------------------------------
# Losses and metrics
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def next_token_losses(model: Model, tokens: Int[Tensor, "batch seq"], hooks: Sequence[tuple[str, Hook]] = (), *,
                      batch_size: int = 64) -> Float[Tensor, "batch seq_minus_1"]:
    """Cross-entropy of every next-token prediction (entry `[b, p]` predicts `tokens[b, p+1]`)."""
    device = device_of(model)
    return torch.cat([token_losses(model, tokens[start: start + batch_size].to(device), hooks).cpu()
                      for start in range(0, len(tokens), batch_size)])


def position_chunks(positions: Int[Tensor, "batch"], batch_size: int) -> Iterator[tuple[Int[Tensor, "rows"], int]]:
    """Split prompts into chunks of similar length: yields `(row_indices, width)` in order of increasing position,
    `width = max position in the chunk + 1` (the columns the chunk needs; right padding beyond it is dropped)."""
    order = torch.argsort(positions.cpu(), stable=True)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        yield rows, int(positions[rows].max()) + 1


@torch.no_grad()
def logits_at(model: Model, tokens: Int[Tensor, "batch seq"], positions: Int[Tensor, "batch"],
              hooks_for: HooksFor | None = None, *, batch_size: int = 64) -> Float[Tensor, "batch d_vocab"]:
    """Logits of the whole vocabulary at one position per prompt.

    tokens right-padded, positions the index of each prompt's predicting position. Prompts run in chunks of
    similar length. `hooks_for(rows, positions_of_rows) -> [(hook_name, hook)]` builds the hooks of each chunk from
    its row indices and positions (hooks such as `splice_hook(sae, positions=...)` need them); None runs the clean
    model.
    """
    out = torch.empty(0)
    for rows, width in position_chunks(positions, batch_size):
        chunk = tokens[rows, :width].to(device_of(model))
        pos = positions[rows]
        hooks = hooks_for(rows, pos) if hooks_for is not None else []
        logits = run_with_hooks(model, chunk, fwd_hooks=[*hooks, *unembed_only_at(model, pos)])
        values = (logits[:, 0] if logits.shape[1] == 1 else
                  logits[torch.arange(len(rows), device=logits.device), pos.to(logits.device)]).float()
        if out.numel() == 0:
            out = torch.empty(len(tokens), values.shape[-1])
        out[rows] = values.cpu()
    return out


@torch.no_grad()
def logits_at_each(model: Model, tokens: Int[Tensor, "batch seq"], positions: Int[Tensor, "batch"],
                   variants: Sequence[HooksFor | None], *, batch_size: int = 8) -> list[Float[Tensor, "batch d_vocab"]]:
    """`logits_at` under each of `variants` (None: the clean model), for interventions at each prompt's predicting
    position only (as `at_positions` builds them): such a hook changes nothing before that position, so per chunk
    of similar length the prompts run once without hooks, and each variant reruns only the positions from the
    chunk's first predicting position on, from its first hooked block (`replay.SuffixReplay`); its
    `hooks_for(rows, positions)` gets the positions counted from there. Where a chunk or a variant cannot be
    replayed, it runs as `logits_at` runs it."""
    outs = [torch.empty(len(tokens), model.cfg.d_vocab) for _ in variants]
    for rows, width in position_chunks(positions, batch_size):
        chunk, pos = tokens[rows, :width].to(device_of(model)), positions[rows]
        start = int(pos.min())
        try:
            replay = SuffixReplay(model, chunk, start)
        except ValueError:
            replay = None
        for out, hooks_for in zip(outs, variants):
            out[rows] = _replayed_or_run(model, chunk, rows, pos, start, hooks_for, replay)
    return outs


def _replayed_or_run(model, chunk: Tensor, rows: Tensor, pos: Tensor, start: int, hooks_for: HooksFor | None,
                     replay: SuffixReplay | None) -> Float[Tensor, "rows d_vocab"]:
    """One chunk's logits at `pos` under `hooks_for`: replayed from `start` where `replay` can, else a full run."""
    index = torch.arange(len(rows))
    if replay is not None:
        try:
            logits = replay.clean_logits if hooks_for is None else replay.logits(hooks_for(rows, pos - start))
            return logits[index, (pos - start).to(logits.device)].float().cpu()
        except ValueError:
            pass
    hooks = hooks_for(rows, pos) if hooks_for is not None else []
    logits = run_with_hooks(model, chunk, fwd_hooks=[*hooks, *unembed_only_at(model, pos)])
    return (logits[:, 0] if logits.shape[1] == 1 else logits[index, pos.to(logits.device)]).float().cpu()


def logprobs_at(model: Model, tokens: Int[Tensor, "batch seq"], positions: Int[Tensor, "batch"],
                hooks_for: HooksFor | None = None, *, batch_size: int = 64) -> Float[Tensor, "batch d_vocab"]:
    """Log-probabilities of the whole vocabulary at one position per prompt (see `logits_at`)."""
    return logits_at(model, tokens, positions, hooks_for, batch_size=batch_size).log_softmax(-1)


def at_positions(hook_name: str, make_hook: Callable[[Int[Tensor, "batch"]], Hook]) -> HooksFor:
    """`hooks_for` that puts `make_hook(positions_of_rows)` on `hook_name`, e.g.
    `at_positions(name, lambda pos: feature_ablation_hook(sae, [f], pos))`: an intervention at each prompt's
    predicting position only."""
    return lambda rows, positions: [(hook_name, make_hook(positions))]


def answer_losses(logprobs: Float[Tensor, "batch d_vocab"], answers: Int[Tensor, "batch"]) -> Float[Tensor, "batch"]:
    """`-log p(answer)` per prompt."""
    return -logprobs.gather(-1, answers[:, None].to(logprobs.device))[:, 0]


def answer_measures(logits: Float[Tensor, "batch d_vocab"], answers: Int[Tensor, "batch"]
                    ) -> dict[str, Float[Tensor, "batch"]]:
    """The answer's `logprob`, `logit` and `rank` (the number of tokens with a strictly larger logit; 0 = top-1)
    per prompt, the original notebook's three measures of what an ablation does to `."`."""
    answer_logits = logits.gather(-1, answers[:, None].to(logits.device))
    return {"logprob": logits.log_softmax(-1).gather(-1, answers[:, None].to(logits.device))[:, 0],
            "logit": answer_logits[:, 0], "rank": (logits > answer_logits).sum(-1).float()}


def measure_changes(clean: dict[str, Float[Tensor, "batch"]], intervened: dict[str, Float[Tensor, "batch"]]
                    ) -> dict[str, tuple[float, float]]:
    """`{measure: (mean, half-width of the 95% interval)}` of `clean - intervened` over prompts (the original notebook's
    sign: a positive logprob or logit difference means the intervention lowered it; a negative rank difference means
    the answer fell in rank), with the interval from the prompts actually used (the original notebook's interval always
    used n=200)."""
    out = {}
    for name, before in clean.items():
        change = before - intervened[name]
        out[name] = (change.mean().item(), 1.96 * change.std().item() / len(change) ** 0.5)
    return out


def loss_recovered(clean: float, spliced: float, ablated: float) -> float:
    """`(L_ablated - L_spliced) / (L_ablated - L_clean)`: 1 = the splice is as good as the model, 0 = as bad as the
    ablation."""
    return (ablated - spliced) / (ablated - clean) if ablated != clean else float("nan")


@torch.no_grad()
def feature_activations(model: Model, sae, tokens: Int[Tensor, "batch seq"], *, hook_name: str | None = None,
                        positions: Int[Tensor, "batch"] | None = None, hooks_for: HooksFor | None = None,
                        batch_size: int = 64) -> Float[Tensor, "batch seq d_sae"] | Float[Tensor, "batch d_sae"]:
    """SAE feature activations: `[batch, seq, d_sae]`, or `[batch, d_sae]` at one position per prompt
    (`positions [batch]`; then `hooks_for(rows, positions_of_rows)` may add hooks, as in `logprobs_at`)."""
    hook_name = hook_name or sae.cfg.metadata.hook_name
    device, stop = device_of(model), layers_needed([hook_name])     # the blocks after the hook are not run
    if positions is None:
        out = []
        for start in range(0, len(tokens), batch_size):
            _, cache = model.run_with_cache(tokens[start: start + batch_size].to(device), names_filter=[hook_name],
                                            stop_at_layer=stop)
            out.append(sae.encode(cache[hook_name].to(sae.W_dec.dtype)).cpu())
        return torch.cat(out)
    result = torch.zeros(len(tokens), sae.cfg.d_sae)
    for rows, width in position_chunks(positions, batch_size):
        pos = positions[rows]
        hooks = hooks_for(rows, pos) if hooks_for is not None else []
        with hooks_on(model, hooks):
            _, cache = model.run_with_cache(tokens[rows, :width].to(device), names_filter=[hook_name],
                                            stop_at_layer=stop)
        x = cache[hook_name][torch.arange(len(rows), device=device), pos.to(device)]
        result[rows] = sae.encode(x.to(sae.W_dec.dtype)).cpu()
    return result


@dataclass
class SAEMetrics:
    """Quality of one SAE on a token set (BOS positions excluded everywhere).

    Attributes:
        l0: mean number of active features per token.
        dead_fraction: share of features never active on the token set.
        mse: mean squared error per activation dimension; `explained_variance`: 1 - SSE / total variance.
        loss_clean / loss_spliced / loss_zero: mean next-token loss of the model, with the SAE reconstruction
            spliced in at every non-BOS position, and with the hook zero-ablated there.
        loss_recovered: `(loss_zero - loss_spliced) / (loss_zero - loss_clean)`.
    """

    l0: float
    dead_fraction: float
    mse: float
    explained_variance: float
    loss_clean: float
    loss_spliced: float
    loss_zero: float
    loss_recovered: float
    feature_frequency: Float[Tensor, "d_sae"] | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "feature_frequency"}


@torch.no_grad()
def sae_metrics(model: Model, sae, tokens: Int[Tensor, "n seq"], *, hook_name: str | None = None,
                batch_size: int = 64) -> SAEMetrics:
    """L0, dead fraction, MSE, explained variance and whole-sequence loss recovered of `sae` on `tokens [n, seq]`."""
    hook_name = hook_name or sae.cfg.metadata.hook_name
    d_sae = sae.cfg.d_sae
    fired = torch.zeros(d_sae)
    n_tokens, l0_sum, sse = 0, 0.0, 0.0
    sums, sq_sums = None, None
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start: start + batch_size].to(device_of(model))
        _, cache = model.run_with_cache(chunk, names_filter=[hook_name])
        x = cache[hook_name][:, 1:].reshape(-1, sae.cfg.d_in).to(sae.W_dec.dtype)
        acts = sae.encode(x)
        recon = sae.decode(acts)
        active = (acts > 0).float()
        fired += active.sum(0).cpu()
        l0_sum += float(active.sum())
        sse += float((recon - x).pow(2).sum())
        sums = x.sum(0) if sums is None else sums + x.sum(0)
        sq_sums = x.pow(2).sum(0) if sq_sums is None else sq_sums + x.pow(2).sum(0)
        n_tokens += len(x)
    variance = float((sq_sums - sums.pow(2) / n_tokens).sum())
    not_bos = torch.ones(1, tokens.shape[1], dtype=torch.bool)
    not_bos[:, 0] = False
    clean = next_token_losses(model, tokens, batch_size=batch_size).mean().item()
    spliced = next_token_losses(model, tokens, [(hook_name, splice_hook(sae, positions=not_bos))],
                                batch_size=batch_size).mean().item()
    zero = next_token_losses(model, tokens, [(hook_name, replace_hook(0.0, positions=not_bos))],
                             batch_size=batch_size).mean().item()
    return SAEMetrics(
        l0=l0_sum / n_tokens, dead_fraction=float((fired == 0).float().mean()), mse=sse / (n_tokens * sae.cfg.d_in),
        explained_variance=1 - sse / variance, loss_clean=clean, loss_spliced=spliced, loss_zero=zero,
        loss_recovered=loss_recovered(clean, spliced, zero), feature_frequency=fired / n_tokens)
