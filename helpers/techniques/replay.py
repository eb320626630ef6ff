"""Running a model's blocks from a layer and a position: the engine patching, ablations and clean reads share.

A hook cannot change what comes before it: neither the blocks before the one it sits in nor (attention being
causal) the positions before the first one it writes. So a run under hooks can start late, from an unhooked run's
block inputs and keys and values, through the bridge's own blocks with its processed weights and hooks:
- `Trace`: one unhooked run kept to start runs from any (layer, position) (the patching sweeps, `SuffixReplay`);
- `replayed_logits` / `replayed_runs`: a clean pass, then each variant from its first hooked block;
- `keep_clean_block_inputs`: clean runs kept between calls, so a later run of the same tokens starts at that block;
- `share_prefix` / `hooked_logits` / `activations`: prompts that all begin with the same tokens (worked examples)
  run them once and compute only their own positions, attending to the prefix's kept keys and values.
`fast_path(model)` says, once per model, whether its blocks can be run this way exactly; where not, every run
starts at the embedding.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Iterator, Sequence
from weakref import WeakKeyDictionary

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from helpers.core.components import device_of, hooks_on, layers_needed, Model, run_with_hooks


def equal_up_to_rounding(value: Float[Tensor, "*shape"], reference: Float[Tensor, "*shape"]) -> bool:
    """Equal up to rounding in the reference's dtype."""
    scale = float(reference.abs().max().clamp(min=1.0))
    return float((value - reference).abs().max()) <= 64 * torch.finfo(reference.dtype).eps * scale


# ---- the fast engine: start each patched run where its patch starts -----------------------------------------------
class NoFastPath(Exception):
    """The blocks of this model cannot be run from a layer and a position exactly as the model runs them."""


FAST_HOOKS = {f"hook_{name}" for name in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")} | {
    f"attn.hook_{name}" for name in ("q", "k", "v", "z", "pattern", "attn_scores")} | {"mlp.hook_pre", "mlp.hook_post"}
BEFORE_MLP = ("hook_resid_pre", "ln1.", "attn.", "hook_attn_", "hook_q", "hook_k", "hook_v", "hook_z", "hook_pattern",
              "hook_resid_mid")  # hook points of a block that its MLP's output does not reach
QUERY_AXIS_HOOKS = ("attn.hook_pattern", "attn.hook_attn_scores")  # [batch, head, query_pos, key_pos]
_FAST_PATH: WeakKeyDictionary = WeakKeyDictionary()


def repeat_rows(tensor: Shaped[Tensor, "batch *rest"], n: int) -> Shaped[Tensor, "n_batch *rest"]:
    """`tensor [batch, ...]` repeated `n` times along the batch: `[n * batch, ...]`, variant-major."""
    return tensor if n == 1 else tensor.repeat(n, *(1,) * (tensor.ndim - 1))


def _broadcast_rows(tensor: Tensor, n: int) -> Tensor:
    """A block argument `[batch or 1, ...]` for `n` copies of the batch (one row broadcasts as it is)."""
    return tensor if tensor.shape[0] == 1 else repeat_rows(tensor, n)


class _KeyValueCache:
    """Stands in for the model's key/value cache inside its attention layers during a run through the blocks.

    Each attention layer calls `update(keys, values, layer_index)` with the keys and values of the positions it
    computes (`[rows, n_kv, new_pos, d_head]`, rotary embeddings applied) and attends to what it returns: the kept
    keys and values of the earlier positions (`prefix[layer_index]`, `[batch, n_kv, start, d_head]`, repeated for
    the `repeats` variants of a pass) followed by its own. What each layer got back is kept in `seen`.
    """

    def __init__(self, prefix: dict[int, tuple[Tensor, Tensor]], repeats: int):
        self.prefix, self.repeats, self.seen = prefix, repeats, {}

    def update(self, keys: Tensor, values: Tensor, layer_index: int, *args, **kwargs):  # noqa: ARG002
        if layer_index in self.prefix:
            old_keys, old_values = self.prefix[layer_index]
            keys = torch.cat([repeat_rows(old_keys, self.repeats), keys], dim=-2)
            values = torch.cat([repeat_rows(old_values, self.repeats), values], dim=-2)
        self.seen[layer_index] = (keys, values)
        return keys, values


def _argument_names(block) -> list[str]:
    """The names of a block's positional arguments, to record a call's arguments by name."""
    return [name for name, p in inspect.signature(block.original_component.forward).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def block_calls(model: Model, tokens: Int[Tensor, "batch pos"], stop_at_layer: int | None = None
                ) -> tuple[list[dict], Float[Tensor, "batch pos ..."]]:
    """The arguments the model passes each block on `tokens`, by name (the hidden states first), and its logits (or,
    with `stop_at_layer`, only the blocks before it run and the residual stream there is returned)."""
    calls: list[dict] = []

    def keep(block):
        names = _argument_names(block)

        def hook(module, args, kwargs):  # noqa: ARG001
            calls.append({**dict(zip(names, args)), **kwargs})

        return hook

    handles = [block.register_forward_pre_hook(keep(block), with_kwargs=True) for block in model.blocks]
    try:
        logits = model(tokens, stop_at_layer=stop_at_layer)
    finally:
        for handle in handles:
            handle.remove()
    return calls, logits


def _suffix_argument(name: str, value, start: int, repeats: int, cache: _KeyValueCache):
    """A block argument for a run of positions `start:` of `repeats` copies of the batch; raises `NoFastPath` for
    an argument it does not know how to cut."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "update") and not isinstance(value, Tensor):  # the model's key/value cache
        return cache
    if name == "attention_mask" and isinstance(value, Tensor) and value.ndim in (2, 4):
        return _broadcast_rows(value[:, :, start:] if value.ndim == 4 else value, repeats)  # queries from start
    if name in ("position_ids", "cache_position") and isinstance(value, Tensor):
        return _broadcast_rows(value[..., start:], repeats) if value.ndim > 1 else value[start:]
    if name == "position_embeddings" and isinstance(value, tuple):
        return tuple(_broadcast_rows(part[:, start:], repeats) for part in value)
    raise NoFastPath(f"block argument {name!r} ({type(value).__name__})")


def _run_blocks(model, calls: list[dict], hidden: Tensor, first_layer: int, start: int, repeats: int,
                prefix: dict[int, tuple[Tensor, Tensor]], inputs: list | None = None,
                last_layer: int | None = None) -> tuple[Tensor, _KeyValueCache]:
    """Run blocks `first_layer..last_layer` (default: to the end) on `hidden [repeats * batch, pos - start, d_model]`,
    the residual stream of positions `start:`, attending also to the `prefix` keys and values of positions before
    `start`. Appends each block's input to `inputs` when given. Returns the last block's output and the cache."""
    cache = _KeyValueCache(prefix, repeats)
    last_layer = model.cfg.n_layers - 1 if last_layer is None else last_layer
    for layer in range(first_layer, last_layer + 1):
        if inputs is not None:
            inputs.append(hidden)
        first, *rest = calls[layer]
        kwargs = {name: _suffix_argument(name, calls[layer][name], start, repeats, cache) for name in rest}
        handle = model.blocks[layer].attn.register_forward_pre_hook(_cache_as_past_key_values(cache),
                                                                    with_kwargs=True)
        try:
            output = model.blocks[layer](hidden, **kwargs)
        finally:
            handle.remove()
        hidden = output[0] if isinstance(output, tuple) else output
    return hidden, cache


def _cache_as_past_key_values(cache: _KeyValueCache):
    """A pre-hook on an attention bridge handing it `cache` as `past_key_values`, where it looks for the cache
    (transformers 5's Llama and GPT-2 layers pass theirs on as `cache`, which transformer-lens 3.9's bridge ignores)."""
    def hook(module, args, kwargs):  # noqa: ARG001
        if any(value is cache for value in kwargs.values()) and "past_key_values" not in kwargs:
            return args, {**kwargs, "past_key_values": cache}
        return None

    return hook


def logits_of(model: Model, hidden: Float[Tensor, "*batch d_model"], tokens: list[int] | None = None
              ) -> Float[Tensor, "*batch vocab"]:
    """Logits of `hidden [..., d_model]` (the last block's output): every token's, or only `tokens`' (in that order),
    from the unembedding's rows of those tokens."""
    if tokens is None:
        return model.unembed(model.ln_final(hidden))
    unembed = model.unembed.original_component
    bias = unembed.bias[tokens] if getattr(unembed, "bias", None) is not None else None
    return torch.nn.functional.linear(model.ln_final(hidden), unembed.weight[tokens], bias)


class Trace:
    """An unpatched run of `tokens [batch, pos]` through the blocks, kept to start patched runs from: each block's
    arguments (`calls`) and input (`inputs[layer]`, `[batch, pos, d_model]`), each attention layer's keys and values
    (`keys_values`, `[batch, n_kv, pos, d_head]`) and the logits at the `read` positions of the `vocab` tokens read
    (`[batch, len(read), len(vocab) or d_vocab]`). `recorded`: `block_calls(model, tokens)`, where already run.
    Raises `NoFastPath` when running the blocks this way does not give the model's own logits. Where the
    unembedding's rows of the tokens read do not give the model's logits of those tokens, every token's logits are
    computed (and then selected)."""

    def __init__(self, model: Model, tokens: Int[Tensor, "batch pos"], read: list[int], vocab: list[int] | None = None,
                 recorded: tuple[list[dict], Float[Tensor, "batch pos ..."]] | None = None):
        self.model, self.tokens, self.read, self.vocab = model, tokens, read, vocab
        self.calls, reference = recorded or block_calls(model, tokens)
        if len(self.calls) != model.cfg.n_layers:
            raise NoFastPath("the model does not call each block once")
        self.inputs: list[Tensor] = []
        embedded = next(iter(self.calls[0].values()))
        hidden, cache = _run_blocks(model, self.calls, embedded, 0, 0, 1, {}, self.inputs)
        self.keys_values = cache.seen
        full = logits_of(model, hidden[:, read])
        if not equal_up_to_rounding(full, reference[:, read]):
            raise NoFastPath("running the blocks directly does not give the model's logits")
        self.rows_of_vocab = vocab is not None and equal_up_to_rounding(logits_of(model, hidden[:, read], vocab),
                                                                        full[..., vocab])
        self.logits = full if vocab is None else full[..., vocab]
        self.last_mlp_at_read = equal_up_to_rounding(logits_of(model, self._last_block_at_read()[:, read]), full)

    def _last_mlp_hooks(self, start: int) -> list[tuple[str, Callable]]:
        """Hooks that run the last block's MLP at the read positions only (those of `start:` run), its output
        zero elsewhere: the last block's output is then right at the read positions, all the logits need."""
        layer = self.model.cfg.n_layers - 1
        rows = [p - start for p in self.read if p >= start]
        n_new = self.tokens.shape[1] - start

        def cut(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
            return act[:, rows]

        def put_back(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
            full = act.new_zeros(act.shape[0], n_new, *act.shape[2:])
            full[:, rows] = act
            return full

        return [(f"blocks.{layer}.mlp.hook_in", cut), (f"blocks.{layer}.mlp.hook_out", put_back)]

    def _last_block_at_read(self) -> Tensor:
        """The last block's output on the unpatched run with its MLP at the read positions only."""
        layer = self.model.cfg.n_layers - 1
        with hooks_on(self.model, self._last_mlp_hooks(0)):
            return _run_blocks(self.model, self.calls, self.inputs[layer], layer, 0, 1, {})[0]

    def _unembed(self, hidden: Tensor) -> Tensor:
        """The logits the metric reads: of the `vocab` tokens (from their rows, or selected from all), or all."""
        if self.vocab is None or self.rows_of_vocab:
            return logits_of(self.model, hidden, self.vocab)
        return logits_of(self.model, hidden)[..., self.vocab]

    def run(self, first_layer: int, start: int, repeats: int, hooks, last_layer: int | None = None
            ) -> Float[Tensor, "rows suffix d_model"]:
        """Blocks `first_layer` on, positions `start:` of `repeats` copies of the batch, under `hooks`: the residual
        stream after `last_layer` (default: the last block), `[repeats * batch, pos - start, d_model]`."""
        prefix = {index: (keys[:, :, :start], values[:, :, :start])
                  for index, (keys, values) in self.keys_values.items()} if start else {}
        hidden = repeat_rows(self.inputs[first_layer][:, start:], repeats)
        if last_layer is None and self._narrows_last_mlp(start, hooks):
            hooks = [*hooks, *self._last_mlp_hooks(start)]
        with hooks_on(self.model, hooks):
            return _run_blocks(self.model, self.calls, hidden, first_layer, start, repeats, prefix,
                               last_layer=last_layer)[0]

    def _narrows_last_mlp(self, start: int, hooks) -> bool:
        """Whether a run from `start` under `hooks` may compute the last block's MLP at the read positions only:
        where that gave the model's logits on the unpatched run, some positions of the run are not read, and the
        hooks in the last block are all before its MLP (`BEFORE_MLP`)."""
        last = f"blocks.{self.model.cfg.n_layers - 1}."
        return (self.last_mlp_at_read and sum(p >= start for p in self.read) < self.tokens.shape[1] - start
                and all(not name.startswith(last) or name.removeprefix(last).startswith(BEFORE_MLP)
                        for name, _ in hooks))

    def logits_at_read(self, hidden: Float[Tensor, "rows suffix d_model"], start: int, repeats: int
                       ) -> Float[Tensor, "rows read vocab_read"]:
        """`[repeats * batch, len(read), len(vocab) or d_vocab]`: the read positions before `start` from this run (a
        patch from `start` on cannot change them), the others unembedded from `hidden` (positions `start:`)."""
        logits = self.logits.repeat(repeats, 1, 1)
        late = [i for i, p in enumerate(self.read) if p >= start]
        if late:
            logits[:, late] = self._unembed(hidden[:, [self.read[i] - start for i in late]])
        return logits


def _first_hooked_layer(hooks: Sequence[tuple[str, Callable]], n_layers: int) -> int | None:
    """The first block any of `hooks` sits in (`n_layers` for none); None where a hook is outside `FAST_HOOKS`."""
    layers = [n_layers]
    for name, _ in hooks:
        layer, _, hook = name.removeprefix("blocks.").partition(".")
        if not name.startswith("blocks.") or hook not in FAST_HOOKS:
            return None
        layers.append(int(layer))
    return min(layers)


# ---- clean runs kept between calls: a run under hooks in a late block starts there ---------------------------------
class _KeptInputs:
    """What `keep_clean_block_inputs` keeps per batch of tokens: the input of block `layer` and the arguments of
    the blocks from there on (the other blocks' inputs are dropped: `None`)."""

    def __init__(self, layer: int):
        self.layer, self.runs = layer, {}

    @staticmethod
    def key(tokens: Tensor) -> tuple:
        return tuple(tokens.shape), str(tokens.device), tokens.cpu().numpy().tobytes()

    def keep(self, tokens: Tensor, calls: list[dict]) -> None:
        hidden_name = next(iter(calls[self.layer]))

        def kept(layer: int, name: str, value):
            if name == hidden_name and layer != self.layer:
                return None
            if hasattr(value, "update") and not isinstance(value, Tensor):   # the run's key/value cache: all of its
                return _KeyValueCache({}, 1)                                 # keys and values; a replay brings its own
            return value

        self.runs[self.key(tokens)] = [None] * self.layer + [
            {name: kept(layer, name, value) for name, value in call.items()}
            for layer, call in enumerate(calls[self.layer:], start=self.layer)]

    def calls(self, tokens: Tensor) -> list[dict | None] | None:
        return self.runs.get(self.key(tokens))


_KEPT: WeakKeyDictionary = WeakKeyDictionary()


def keep_clean_block_inputs(model: Model, layer: int | None) -> None:
    """From now on, keep each clean run that `replayed_logits` and `replayed_runs` make (and so
    `losses.token_losses_each`, `neurons.mlp_activations_each`) at the input of block `layer`, per batch of tokens:
    a later run of the same tokens whose hooks and reads all sit in block `layer` or after starts there, without
    re-running the blocks before it (exact: a hook cannot change the blocks before its own). Those two, and
    `losses.token_losses`, `neurons.mlp_activations` and `activations`, start there where they can.
    Notebook 04 keeps the residual stream at its context neuron's layer, where every later ablation starts. Memory:
    one `[batch, pos, d_model]` tensor per batch seen. `None` drops what was kept; a new `layer` starts afresh."""
    if layer is None:
        _KEPT.pop(model, None)
    elif not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be in [0, {model.cfg.n_layers}), got {layer}")
    elif model not in _KEPT or _KEPT[model].layer != layer:
        _KEPT[model] = _KeptInputs(layer)


def _kept_calls(model, tokens: Tensor, first: int | None) -> list[dict | None] | None:
    """The kept clean run of `tokens` where one is kept and every run starts at or after its block (`first`)."""
    kept = _KEPT.get(model)
    if kept is None or first is None or first < kept.layer:
        return None
    return kept.calls(tokens)


def _recorded_calls(model, tokens: Tensor, stop_at_layer: int | None) -> tuple[list[dict], Tensor]:
    """`block_calls`, keeping the run (every block's, so it runs to the end) where `keep_clean_block_inputs` asks."""
    kept = _KEPT.get(model)
    if kept is None:
        return block_calls(model, tokens, stop_at_layer)
    calls, output = block_calls(model, tokens)
    kept.keep(tokens, calls)
    return calls, output


def _start_of(calls: list[dict | None], first: int) -> tuple[int, Tensor]:
    """Where a run from block `first` starts on `calls`: at `first`, or at the kept block before it."""
    start = next(layer for layer in range(first, -1, -1) if calls[layer] is not None
                 and next(iter(calls[layer].values())) is not None)
    return start, next(iter(calls[start].values()))


@torch.no_grad()
def replayed_logits(model: Model, tokens: Int[Tensor, "batch pos"], variants: Sequence[Sequence[tuple[str, Callable]]],
                    *, clean: bool = True) -> Iterator[Float[Tensor, "batch pos d_vocab"]]:
    """The logits of `tokens` without hooks (unless `clean=False`), then under each variant's forward hooks
    (`[(hook_name, fn)]`, as `model.run_with_hooks` takes them), one `[batch, pos, d_vocab]` tensor at a time.

    A hook cannot change the layers before the block it sits in. So the run without hooks keeps every block's
    input, and each hooked run starts at its first hooked block from there (the sweeps' replay of the bridge's
    blocks, see `Trace`): an ablation in layer 23 of 30 costs 7 blocks, not 30. Where `keep_clean_block_inputs`
    kept these tokens' clean run, the run without hooks starts there too. A variant with a hook outside the blocks'
    `FAST_HOOKS`, and every variant of a model whose blocks cannot be replayed (`fast_path`), runs from the embedding.
    """
    replay = fast_path(model)
    firsts = [_first_hooked_layer(hooks, model.cfg.n_layers) if replay else None for hooks in variants]
    kept = _kept_calls(model, tokens, min((f for f in firsts if f is not None), default=None))
    if kept is not None:
        calls = kept
        if clean:
            start, hidden = _start_of(kept, model.cfg.n_layers - 1)
            yield logits_of(model, _run_blocks(model, kept, hidden, start, 0, 1, {})[0])
    elif clean:
        calls, logits = _recorded_calls(model, tokens, None)
        yield logits
        del logits
    else:
        calls, firsts = None, [None] * len(variants)   # nothing to start from: each variant from the embedding
    for hooks, first in zip(variants, firsts):
        if first is None or first == model.cfg.n_layers:
            yield run_with_hooks(model, tokens, fwd_hooks=list(hooks))
            continue
        start, hidden = _start_of(calls, first)
        with hooks_on(model, list(hooks)):
            final = _run_blocks(model, calls, hidden, start, 0, 1, {})[0]
        yield logits_of(model, final)


@torch.no_grad()
def replayed_runs(model: Model, tokens: Int[Tensor, "batch pos"], variants: Sequence[Sequence[tuple[str, Callable]]]
                  ) -> Iterator[int]:
    """Run `tokens` under each variant's forward hooks in turn, yielding the variant's index once its hooks have
    fired: for hooks that read activations (a capture) as much as for hooks that write them.

    Blocks past the last one any hook sits in are not run. A shared run without hooks keeps every block's input up
    to there, and each variant starts at its own first hooked block (see `replayed_logits`): reading layers 24-29
    under a pin in layer 23 costs one shared pass through block 29 and six blocks per variant; where
    `keep_clean_block_inputs` kept these tokens' clean run, no shared pass at all. Variants with a hook outside the
    blocks' `FAST_HOOKS`, and every variant of a model whose blocks cannot be replayed (`fast_path`), run from the
    embedding.
    """
    n_layers = model.cfg.n_layers
    firsts = [_first_hooked_layer(hooks, n_layers) if fast_path(model) else None for hooks in variants]
    names = [name for hooks in variants for name, _ in hooks]
    last = (max(int(name.removeprefix("blocks.").partition(".")[0]) for name in names)
            if names and all(name.startswith("blocks.") for name in names) else n_layers - 1)
    stop = last + 1 if last + 1 < n_layers else None
    calls = None
    if any(first is not None for first in firsts):
        calls = (_kept_calls(model, tokens, min(first for first in firsts if first is not None))
                 or _recorded_calls(model, tokens, stop)[0])
    for index, (hooks, first) in enumerate(zip(variants, firsts)):
        if first is None:
            run_with_hooks(model, tokens, fwd_hooks=list(hooks), return_type=None, stop_at_layer=stop)
        elif first <= last:
            start, hidden = _start_of(calls, first)
            with hooks_on(model, list(hooks)):
                _run_blocks(model, calls, hidden, start, 0, 1, {}, last_layer=last)
        yield index


def kept_run_available(model: Model, tokens: Int[Tensor, "batch pos"], hooks: Sequence[tuple[str, Callable]]) -> bool:
    """Whether `keep_clean_block_inputs` kept a clean run of `tokens` that a run under `hooks` can start from."""
    return fast_path(model) and _kept_calls(model, tokens, _first_hooked_layer(hooks, model.cfg.n_layers)) is not None


@torch.no_grad()
def activations(model: Model, tokens: Int[Tensor, "batch pos"], names: Sequence[str],
                fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> dict[str, Float[Tensor, "batch ..."]]:
    """`{name: activation}` at the hook points `names` of the run of `tokens` under `fwd_hooks` (default: the clean
    run): from the clean run `keep_clean_block_inputs` kept for these tokens where every hook and name is in its
    block or after (reading layer 29 of 30 then costs one block), or after the prefix `share_prefix` registered
    where the rows begin with it (the prefix's positions from its one clean run), else `run_with_cache`; none runs
    past the last block read. A name the run never reaches (`hook_pos_embed` of a model without learned positions)
    is left out, as `run_with_cache` leaves it."""
    captured: dict[str, Tensor] = {}

    def capture(name: str) -> Callable:
        def hook(act: Tensor, hook=None) -> None:  # noqa: ARG001
            captured[name] = act.detach().clone()
        return hook

    hooks = [*fwd_hooks, *((name, capture(name)) for name in names)]
    if kept_run_available(model, tokens, hooks):
        for _ in replayed_runs(model, tokens, [hooks]):
            pass
        return captured
    shared = _shared_prefix_of(model, tokens)
    last = layers_needed(names)
    if shared is not None and last is not None:
        try:
            _run_after_prefix(model, shared, tokens, hooks, last_layer=max(0, last - 1))
            return captured
        except (NoFastPath, _PrefixWritten):
            captured.clear()
    with hooks_on(model, list(fwd_hooks)):
        _, cache = model.run_with_cache(tokens, names_filter=list(names), stop_at_layer=last)
    return {name: cache[name] for name in names if name in cache}


class SuffixReplay:
    """One run of `tokens [batch, pos]` without hooks, kept to rerun only positions `start:` under hooks, each run
    from its first hooked block (the sweeps' engine, `Trace`), attending to the kept keys and values of the earlier
    positions. Exact for hooks that write nothing before `start`; they see activations of positions `start:` only
    (position `p` at index `p - start`). Raises `ValueError` where the model's blocks cannot be replayed
    (`fast_path`, or the run does not reproduce the model's logits)."""

    def __init__(self, model: Model, tokens: Int[Tensor, "batch pos"], start: int):
        if not fast_path(model):
            raise ValueError("this model's blocks cannot be replayed")
        try:
            self.trace = Trace(model, tokens, list(range(start, tokens.shape[1])))
        except NoFastPath as problem:
            raise ValueError(str(problem)) from problem
        self.model, self.start = model, start

    @property
    def clean_logits(self) -> Float[Tensor, "batch suffix d_vocab"]:
        return self.trace.logits

    def logits(self, hooks: Sequence[tuple[str, Callable]]) -> Float[Tensor, "batch suffix d_vocab"]:
        """Logits of positions `start:` under `hooks` (names in `FAST_HOOKS`; `ValueError` otherwise)."""
        first = _first_hooked_layer(hooks, self.model.cfg.n_layers)
        if first is None:
            raise ValueError(f"a hook outside the blocks' replayable hook points: {[name for name, _ in hooks]}")
        if first == self.model.cfg.n_layers:
            return self.trace.logits
        hidden = self.trace.run(first, self.start, 1, list(hooks))
        return self.trace.logits_at_read(hidden, self.start, 1)


# ---- a prefix every prompt begins with, run once ------------------------------------------------------------------
MIN_SHARED_PREFIX = 8  # tokens: a shorter prefix saves less than running it separately costs
PREFIX_TOLERANCE = 1e-4  # a hook may change the shared positions by this fraction of the activation's largest value


class _PrefixWritten(Exception):
    """A hook changed an activation at the shared prefix's positions: the run must start at the embedding."""


class _SharedPrefix:
    """The clean run of one row of prefix tokens `[n]`, kept so that runs of prompts that begin with it compute only
    the positions after it: each attention layer's keys and values (`keys_values[layer]`, `[1, n_kv, n, d_head]`),
    the last block's output (`final`, `[1, n, d_model]`), the clean activation at each hook point a run has hooked
    (`activations`, `[1, n, ...]`, recorded on first use) and, per prompt length, the block arguments of one prompt
    (`templates`, None where running that way does not give the model's logits)."""

    def __init__(self, model, prefix: Int[Tensor, " n"]):
        self.model, self.tokens = model, prefix
        self.calls, _ = block_calls(model, prefix[None])
        self.embedded = next(iter(self.calls[0].values()))
        self.final, cache = _run_blocks(model, self.calls, self.embedded, 0, 0, 1, {})
        self.keys_values = cache.seen
        self.activations: dict[str, Tensor] = {}
        self.templates: dict[int, list[dict] | None] = {}

    @torch.no_grad()
    def activation(self, names: Sequence[str]) -> dict[str, Tensor]:
        """`{name: [1, n, ...]}` the clean prefix's activations at `names` (hook points inside the blocks)."""
        missing = [name for name in dict.fromkeys(names) if name not in self.activations]
        if missing:
            def capture(name: str) -> Callable:
                def hook(act: Tensor, hook=None) -> None:  # noqa: ARG001
                    self.activations[name] = act.detach().clone()
                return hook

            with hooks_on(self.model, [(name, capture(name)) for name in missing]):
                _run_blocks(self.model, self.calls, self.embedded, 0, 0, 1, {})
        return {name: self.activations[name] for name in names}

    @torch.no_grad()
    def template(self, tokens: Tensor) -> list[dict] | None:
        """The block arguments of the first prompt of `tokens [batch, pos]` (one per prompt length), where running its
        positions after the prefix from them gives the model's logits; None where it does not."""
        length = tokens.shape[1]
        if length not in self.templates:
            calls, logits = block_calls(self.model, tokens[:1])
            final = _run_blocks(self.model, calls, next(iter(calls[0].values()))[:, len(self.tokens):], 0,
                                len(self.tokens), 1, self.keys_values)[0]
            suffix = logits_of(self.model, final)
            self.templates[length] = calls if equal_up_to_rounding(suffix, logits[:, len(self.tokens):]) else None
        return self.templates[length]


_SHARED_PREFIX: WeakKeyDictionary = WeakKeyDictionary()


@torch.no_grad()
def share_prefix(model: Model, prefix: Int[Tensor, " n"] | None) -> int:
    """From now on, `hooked_logits` runs prompts that all begin with `prefix` (token ids, e.g. few-shot examples
    before every arithmetic prompt) from the end of one clean run of it: only the positions after it are computed,
    attending to its kept keys and values. Exact where the hooks leave the prefix's positions as they are (up to
    `PREFIX_TOLERANCE`: a mean over prompts that share the prefix is its clean value); a run whose hook changes them
    runs again from the embedding. Returns the length shared: 0 (nothing kept) for `None`, a prefix shorter than
    `MIN_SHARED_PREFIX`, or a model whose blocks cannot be replayed (`fast_path`)."""
    _SHARED_PREFIX.pop(model, None)
    if prefix is None or len(prefix) < MIN_SHARED_PREFIX or not fast_path(model):
        return 0
    _SHARED_PREFIX[model] = _SharedPrefix(model, torch.as_tensor(prefix).to(device_of(model)))
    return len(prefix)


class _BlockInput(Exception):
    """Raised by a pre-hook on block 0 once it holds the block's input: the embedding is all that was needed."""

    def __init__(self, call: dict):
        self.call = call


def _block_input(model, tokens: Tensor) -> dict:
    """Block 0's arguments on `tokens`, by name (the residual stream first), under the hooks already on (those
    outside the blocks, e.g. `hook_embed`); no block runs."""
    names = _argument_names(model.blocks[0])

    def stop(module, args, kwargs):  # noqa: ARG001
        raise _BlockInput({**dict(zip(names, args)), **kwargs})

    handle = model.blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(tokens)
    except _BlockInput as reached:
        return reached.call
    finally:
        handle.remove()
    raise NoFastPath("the model did not call its first block")


def _same_for_every_row(call: dict, template: dict) -> bool:
    """Whether block 0's tensor arguments of a batch (apart from the residual stream) are the template prompt's."""
    for name, value in list(call.items())[1:]:
        values = zip(value, template[name]) if isinstance(value, tuple) else [(value, template.get(name))]
        for mine, theirs in values:
            if isinstance(mine, Tensor) and not (isinstance(theirs, Tensor) and mine.shape[1:] == theirs.shape[1:]
                                                 and torch.equal(mine, theirs.expand_as(mine))):
                return False
    return True


def _after_prefix(fn: Callable, clean: Tensor, n: int) -> Callable:
    """Hook `fn` on a run of the positions after an `n`-token prefix: it sees the prompt's whole activation (the
    clean prefix, `clean [1, n, ...]`, then the run's positions) and must leave the prefix's positions as they are."""
    def wrapped(act: Tensor, hook=None) -> Tensor:
        whole = torch.cat([clean.expand(len(act), *clean.shape[1:]).to(act.dtype), act], dim=1)
        out = fn(whole, hook=hook)
        out = whole if out is None else out
        if out.shape != whole.shape:
            raise _PrefixWritten(f"a hook changed the shape of {tuple(whole.shape)}")
        with torch.no_grad():
            if not torch.equal(out[:, :n], whole[:, :n]) and not _within_tolerance(out[:, :n], clean):
                raise _PrefixWritten("a hook changed the shared prefix")
        return out[:, n:].contiguous()

    return wrapped


def _run_after_prefix(model, shared: _SharedPrefix, tokens: Tensor, fwd_hooks: Sequence[tuple[str, Callable]],
                      last_layer: int | None = None) -> Tensor | None:
    """The logits of `tokens [batch, pos]`, which begin with `shared`'s prefix, under `fwd_hooks`, computing only the
    positions after the prefix (raises `NoFastPath` or `_PrefixWritten` where that cannot give the model's run).
    With `last_layer`, the blocks after it and the unembedding do not run, and nothing is returned."""
    n = len(shared.tokens)
    inside = [(name, hook) for name, hook in fwd_hooks if name.startswith("blocks.")]
    if any(name.endswith(QUERY_AXIS_HOOKS) for name, _ in inside):
        raise NoFastPath("a hook on an attention pattern")
    template = shared.template(tokens)
    if template is None:
        raise NoFastPath("running after the prefix does not give the model's logits")
    clean = shared.activation([name for name, _ in inside])
    with hooks_on(model, [(name, hook) for name, hook in fwd_hooks if not name.startswith("blocks.")]):
        call = _block_input(model, tokens)
        if not _same_for_every_row(call, template[0]):
            raise NoFastPath("the prompts' block arguments differ (padding?)")
        with hooks_on(model, [(name, _after_prefix(hook, clean[name], n)) for name, hook in inside]):
            final, cache = _run_blocks(model, template, next(iter(call.values()))[:, n:], 0, n, len(tokens),
                                       shared.keys_values, last_layer=last_layer)
        if len(cache.seen) != (model.cfg.n_layers if last_layer is None else last_layer + 1):
            raise NoFastPath("an attention layer did not use the prefix's keys and values")
        if last_layer is not None:
            return None
        final = torch.cat([shared.final.expand(len(tokens), -1, -1).to(final.dtype), final], dim=1)
        return logits_of(model, final)


def hooked_logits(model: Model, tokens: Int[Tensor, "batch pos"], fwd_hooks: Sequence[tuple[str, Callable]] = ()
                  ) -> Float[Tensor, "batch pos_read d_vocab"]:
    """`components.run_with_hooks(model, tokens, fwd_hooks)`, computing only the positions after the prefix that
    `share_prefix` registered where every prompt begins with it (see there): a few-shot prefix of 24 tokens before
    4-token prompts then costs a seventh of the run. Hooks see each prompt's whole activation, prefix included;
    gradients do not reach the prefix's positions (its run's activations are constants). Elsewhere, and where a
    hook changes the prefix, the whole run from the embedding."""
    shared = _shared_prefix_of(model, tokens)
    if shared is not None:
        try:
            return _run_after_prefix(model, shared, tokens, fwd_hooks)
        except (NoFastPath, _PrefixWritten):
            pass
    return run_with_hooks(model, tokens, fwd_hooks=list(fwd_hooks))


def sources_match_prefix(model: Model, tokens: Int[Tensor, "batch pos"], sources: dict[str, Float[Tensor, "batch ..."]]
                         ) -> bool:
    """Whether a run of `tokens` starts after a shared prefix and `sources` (activations of other prompts, by hook
    name inside the blocks) hold its clean activations at its positions: a difference there is then 0, and the
    gradient a run after the prefix does not compute at those positions is not needed."""
    shared = _shared_prefix_of(model, tokens)
    if shared is None or not all(name.startswith("blocks.") and not name.endswith(QUERY_AXIS_HOOKS)
                                 for name in sources):
        return False
    n, clean = len(shared.tokens), shared.activation(list(sources))
    return all(_within_tolerance(source[:, :n], clean[name]) for name, source in sources.items())


def _within_tolerance(value: Tensor, clean: Tensor) -> bool:
    """Whether `value` (rows of a prefix's activation) is the prefix's `clean [1, ...]` activation up to
    `PREFIX_TOLERANCE` of its largest value."""
    scale = float(clean.abs().max().clamp(min=1e-12))
    return float((value - clean.to(value.dtype)).abs().max()) <= PREFIX_TOLERANCE * scale


def _shared_prefix_of(model, tokens: Tensor) -> _SharedPrefix | None:
    """The prefix `share_prefix` registered for `model` where every row of `tokens` begins with it and goes on."""
    shared = _SHARED_PREFIX.get(model)
    n = 0 if shared is None else len(shared.tokens)
    if n and tokens.shape[1] > n and bool((tokens[:, :n] == shared.tokens.to(tokens.device)).all()):
        return shared
    return None


def _fast_path_problem(model) -> str | None:
    """Why this model's blocks cannot be run from a layer and a position exactly (None: they can). A probe on two
    rows of six tokens: every start (layer, position) in a few must give the logits of the full run."""
    if getattr(model.cfg, "attention_dir", "causal") != "causal":
        return "attention is not causal"
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=generator).to(device_of(model))
    try:
        trace = Trace(model, tokens, list(range(6)))
        for layer, start in [(0, 3), (model.cfg.n_layers - 1, 5), (model.cfg.n_layers // 2, 1)]:
            hidden = trace.run(layer, start, 2, [])
            if not equal_up_to_rounding(trace.logits_at_read(hidden, start, 2), repeat_rows(trace.logits, 2)):
                return f"a run from layer {layer}, position {start} does not give the full run's logits"
    except NoFastPath as problem:
        return str(problem)
    except Exception as error:  # noqa: BLE001 - any failure of the probe means: not this way
        return f"{type(error).__name__}: {error}"
    return None


@torch.no_grad()
def fast_path(model: Model) -> bool:
    """Whether sweeps on `model` start each patched run at its patch (probed once per model, see `Trace`); where
    not, they run every variant from the embedding, as before, and say why once."""
    if model not in _FAST_PATH:
        problem = _fast_path_problem(model)
        if problem is not None:
            architecture = getattr(model.cfg, "architecture", None) or type(model).__name__
            warnings.warn(f"patching on {architecture} runs each variant from the embedding (slower): {problem}")
        _FAST_PATH[model] = problem is None
    return _FAST_PATH[model]
