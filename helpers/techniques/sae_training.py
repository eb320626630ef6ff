"""Training sparse autoencoders on a model's activations, with the project's own loop.

The SAEs are SAELens `StandardSAE`s (`helpers.techniques.sae` saves, loads, splices and measures them); only the
training is ours:

- activations of one or more hooks (e.g. `blocks.{L}.mlp.hook_post`) are streamed from the model in batches of
  sequences into a shuffled buffer (`activation_stream`); the BOS position is left out (its activation is a
  constant outlier);
- inputs are scaled by one constant so that `E||x||^2 = d_in` while training, which makes the L1 coefficient
  independent of the activation scale; the constant is folded into the weights before the SAE is returned;
- loss = MSE (summed over `d_in`, averaged over tokens) + `l1_coefficient` x sum of feature activations (averaged
  over tokens: the coefficient does not depend on the batch size, unlike the original notebook's); the original
  notebook's alternative `sqrt + Hoyer-square` regulariser is available as `reg="sqrt_hoyer"`;
- decoder rows are kept at unit norm (gradient parallel to each row removed, rows renormalised after each step);
- dead features are resampled a few times early on (inputs drawn with probability proportional to their squared
  reconstruction error, the original notebook's / Anthropic's recipe), their Adam moments reset.

Why not SAELens' own trainer. `SAETrainer(cfg, sae, data_provider)` takes any iterator of `[batch, d_in]` tensors
and needs no HookedTransformer (that is the runner, `LanguageModelSAETrainingRunner`, with its `ActivationsStore`),
so it could be fed `activation_stream`. But it trains a different SAE: its private `_train_step` clips the gradient
norm at 1.0, hard-coded; it weights the L1 penalty by the decoder rows' norms instead of keeping the rows at unit
norm; it counts dead features but never resamples them; and it takes no seed. A 30-line subclass reproduced this
loop to 1e-6 only after monkeypatching the clip out of a private method, which a SAELens release may change under
us; the loop below is as short, and states every choice.

Functions take the model and tensors and return SAEs, tensors or small dataclasses; nothing prints or plots.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from helpers.core.components import device_of, Model
from helpers.techniques.sae import collect_activations, sae_from_dict, sae_to_dict


# ----------------------------------------------------------------------------------------------------------------
# A fresh SAE, and the activations it learns from
# ----------------------------------------------------------------------------------------------------------------
def new_sae(d_in: int, d_sae: int, *, hook_name: str = "", model_name: str = "", seed: int = 0,
            device: str | torch.device = "cpu", context_size: int | None = None, prepend_bos: bool = True):
    """A freshly initialised SAELens `StandardSAE` (decoder rows unit norm, encoder = decoder transposed, zero
    biases), with the hook and model recorded in its metadata."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name=hook_name, model_name=model_name, prepend_bos=prepend_bos,
                           context_size=context_size)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, device=str(device), metadata=metadata)
    torch.manual_seed(seed)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_dec.data = F.normalize(sae.W_dec.data, dim=-1)
        sae.W_enc.data = sae.W_dec.data.T.clone().contiguous()
    return sae


def activation_stream(model: Model, tokens: Int[Tensor, "n_seq seq"], hook_names: Sequence[str], *,
                      model_batch_size: int = 32, buffer_rows: int = 256, batch_size: int = 1024, seed: int = 0,
                      skip_first: int = 1) -> Iterator[dict[str, Float[Tensor, "batch d"]]]:
    """Endless shuffled batches `{hook: [batch_size, d]}` of activations, read `model_batch_size` sequences at a
    time into a buffer of `buffer_rows` sequences; the sequence order is reshuffled every pass over `tokens`."""
    generator = torch.Generator().manual_seed(seed)
    n_rows = len(tokens)
    order = torch.randperm(n_rows, generator=generator)
    cursor = 0
    while True:
        parts: dict[str, list[Tensor]] = {name: [] for name in hook_names}
        taken = 0
        while taken < min(buffer_rows, n_rows):
            if cursor >= n_rows:
                order, cursor = torch.randperm(n_rows, generator=generator), 0
            rows = order[cursor: cursor + min(model_batch_size, buffer_rows - taken)]
            cursor += len(rows)
            taken += len(rows)
            for name, acts in collect_activations(model, tokens[rows], hook_names, skip_first=skip_first).items():
                parts[name].append(acts.cpu())
        buffer = {name: torch.cat(chunks) for name, chunks in parts.items()}
        n = len(next(iter(buffer.values())))
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            index = perm[start: start + batch_size]
            yield {name: acts[index] for name, acts in buffer.items()}


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SAETrainConfig:
    """Knobs of `train_saes` (defaults sized for the toy models on a CPU).

    Attributes:
        expansion_factor: d_sae = expansion_factor x d_in.
        l1_coefficient: weight of the L1 penalty per token, on inputs scaled to `E||x||^2 = d_in`.
        reg: "l1", or "sqrt_hoyer" (the original notebook's combined sqrt + Hoyer-square penalty; `hoyer_coefficient`
            weights the Hoyer term).
        steps, batch_size, lr, betas, warmup_steps: Adam on batches of `batch_size` activations.
        model_batch_size, buffer_rows: sequences per model forward pass, and per shuffled buffer.
        resample_steps: steps at which dead features are resampled; a feature is dead when it did not fire in the
            last `dead_window` steps.
        seed: initialisation, data order and resampling.
    """

    expansion_factor: int = 4
    l1_coefficient: float = 1.0
    reg: str = "l1"
    hoyer_coefficient: float = 0.0
    steps: int = 1000
    batch_size: int = 1024
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    model_batch_size: int = 32
    buffer_rows: int = 256
    resample_steps: tuple[int, ...] = (200, 400)
    dead_window: int = 150
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reg not in {"l1", "sqrt_hoyer"}:
            raise ValueError(f"reg must be 'l1' or 'sqrt_hoyer', got {self.reg!r}")
        if self.expansion_factor < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("expansion_factor, steps and batch_size must be >= 1")


@dataclass
class SAETrainStats:
    """Per-step history of one SAE's training (on the scaled inputs) and what was resampled."""

    scale: float = 1.0
    mse: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    resampled: dict[int, int] = field(default_factory=dict)


def sparsity_penalty(acts: Float[Tensor, "batch d_sae"], config: SAETrainConfig) -> Float[Tensor, ""]:
    """Mean over tokens of the sparsity penalty of feature activations."""
    if config.reg == "l1":
        return config.l1_coefficient * acts.sum(-1).mean()
    # sqrt below 1, linear above (the original notebook's "sqrt")
    soft = torch.where(acts < 1, (acts + 1e-9).sqrt(), acts)
    hoyer = acts.sum(-1) ** 2 / (acts.pow(2).sum(-1) + 1e-9)
    return config.l1_coefficient * soft.sum(-1).mean() + config.hoyer_coefficient * hoyer.mean()


def _sae_forward(sae, x: Float[Tensor, "batch d_in"]
                 ) -> tuple[Float[Tensor, "batch d_sae"], Float[Tensor, "batch d_in"]]:
    acts = sae.encode(x)
    return acts, sae.decode(acts)


@torch.no_grad()
def _resample_dead(sae, optimizer, dead: Bool[Tensor, "d_sae"], x: Float[Tensor, "batch d_in"],
                   generator: torch.Generator) -> int:
    """Re-initialise dead features from inputs drawn with probability ~ squared reconstruction error."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return 0
    _, recon = _sae_forward(sae, x)
    weights = (recon - x).pow(2).sum(-1).pow(2)
    if float(weights.sum()) <= 0:
        return 0
    picks = torch.multinomial(weights.cpu(), n_dead, replacement=n_dead > len(x), generator=generator)
    directions = F.normalize(x[picks.to(x.device)] - sae.b_dec, dim=-1)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    index = dead.nonzero()[:, 0]
    sae.W_dec.data[index] = directions
    sae.W_enc.data[:, index] = directions.T * 0.2 * enc_norm
    sae.b_enc.data[index] = 0.0
    for param, rows in ((sae.W_dec, (index,)), (sae.W_enc, (slice(None), index)), (sae.b_enc, (index,))):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][rows] = 0.0
    return n_dead


def train_saes(model: Model, tokens: Int[Tensor, "n_seq seq"], hook_names: Sequence[str],
               config: SAETrainConfig = SAETrainConfig(), *,
               model_name: str = "", progress: bool = True) -> tuple[dict[str, object], dict[str, SAETrainStats]]:
    """Train one SAE per hook on the activations of `tokens [n_seq, seq]` (BOS first), sharing the model's forward
    passes. Returns `({hook: StandardSAE}, {hook: SAETrainStats})`; the SAEs work on unscaled activations."""
    device = device_of(model)
    stream = activation_stream(model, tokens, hook_names, model_batch_size=config.model_batch_size,
                               buffer_rows=config.buffer_rows, batch_size=config.batch_size, seed=config.seed)
    first = next(stream)
    saes, optimizers, stats, last_fired = {}, {}, {}, {}
    for i, name in enumerate(hook_names):
        d_in = first[name].shape[-1]
        sae = new_sae(d_in, d_in * config.expansion_factor, hook_name=name, model_name=model_name,
                      seed=config.seed + i, device=device, context_size=tokens.shape[1])
        scale = math.sqrt(d_in) / float(first[name].norm(dim=-1).pow(2).mean().sqrt().clamp(min=1e-8))
        with torch.no_grad():  # start b_dec at the (scaled) mean, a standard initialisation
            sae.b_dec.data = (first[name].to(device) * scale).mean(0)
        saes[name] = sae
        optimizers[name] = torch.optim.Adam(sae.parameters(), lr=config.lr, betas=config.betas)
        stats[name] = SAETrainStats(scale=scale)
        last_fired[name] = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(config.seed + 7919)
    batch = first
    with torch.enable_grad():
        bar = tqdm(range(config.steps), desc=f"SAEs on {len(hook_names)} hook(s)", disable=not progress,
                   mininterval=1.0)
        for step in bar:
            if step > 0:
                batch = next(stream)
            lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
            for name in hook_names:
                sae, optimizer, record = saes[name], optimizers[name], stats[name]
                x = batch[name].to(device) * record.scale
                if step in config.resample_steps:
                    dead = (step - last_fired[name]) >= config.dead_window
                    record.resampled[step] = _resample_dead(sae, optimizer, dead, x, generator)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                acts, recon = _sae_forward(sae, x)
                mse = (recon - x).pow(2).sum(-1).mean()
                loss = mse + sparsity_penalty(acts, config)
                loss.backward()
                with torch.no_grad():  # keep decoder rows on the unit sphere
                    W = sae.W_dec
                    W.grad -= (W.grad * W.data).sum(-1, keepdim=True) * W.data
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    sae.W_dec.data = F.normalize(sae.W_dec.data, dim=-1)
                    fired = (acts > 0).any(0)
                    last_fired[name][fired] = step
                record.mse.append(float(mse.detach()) / x.shape[-1])
                record.l0.append(float((acts > 0).float().sum(-1).mean()))
                record.loss.append(float(loss.detach()))
            if progress and (step % 50 == 0 or step == config.steps - 1):
                bar.set_postfix({f"{n.split('.')[1] if n.count('.') else n}": f"mse {stats[n].mse[-1]:.3f} L0 {stats[n].l0[-1]:.0f}"
                                 for n in hook_names}, refresh=False)
    for name, sae in saes.items():
        sae.fold_activation_norm_scaling_factor(stats[name].scale)
        sae.eval()
        for param in sae.parameters():
            param.requires_grad_(False)
    return saes, stats


def cached_saes(model: Model, tokens: Int[Tensor, "n_seq seq"], hook_names: Sequence[str],
                config: SAETrainConfig = SAETrainConfig(), *,
                model_name: str = "", progress: bool = True, refresh: bool = False,
                cache_dir: str | Path | None = None) -> tuple[dict[str, object], dict[str, SAETrainStats]]:
    """`train_saes`, cached under `data/cache/` by the model's weights, the tokens, the hooks and the config (and the
    SAELens version): a second call with the same inputs loads instead of training."""
    import sae_lens

    from helpers.core import cache

    key = {"model": cache.fingerprint(_weights(model)), "tokens": tokens, "hooks": list(hook_names),
           "config": asdict(config), "sae_lens": sae_lens.__version__, "model_name": model_name}

    def compute() -> dict:
        saes, stats = train_saes(model, tokens, hook_names, config, model_name=model_name, progress=progress)
        return {name: {"sae": sae_to_dict(saes[name]), "stats": asdict(stats[name])} for name in hook_names}

    stored = cache.cached("sae", key, compute, cache_dir=cache_dir, refresh=refresh)
    device = device_of(model)
    saes = {name: sae_from_dict(stored[name]["sae"], device) for name in hook_names}
    return saes, {name: SAETrainStats(**stored[name]["stats"]) for name in hook_names}


def _weights(model) -> dict[str, Tensor]:
    """The model's parameters, for fingerprinting (buffers such as masks left out)."""
    return {name: param for name, param in model.named_parameters()}
