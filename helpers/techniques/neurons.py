"""Neurons and probes: activation statistics, correlations with a target, and scikit-learn probes.

Streaming reductions (`RunningStats`, `NeuronClassifierAccumulator`, `TopKAccumulator`, `scan_neurons`,
`activation_difference_stats`) hold O(n_neurons) state and one batch of activations, never a whole corpus.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int, Shaped
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import accuracy_score, mean_squared_error, r2_score
from sklearn.model_selection import train_test_split
from torch import Tensor

from helpers.core.components import hook_name, layers_needed, Model, run_with_hooks
from helpers.techniques.replay import kept_run_available, replayed_runs


@dataclass
class ProbeResult:
    """A fitted probe and its held-out scores.

    Attributes:
        model: the fitted scikit-learn estimator.
        score: R^2 (regression) or accuracy (classification) on the held-out split.
        baseline: the same score for predicting the training mean (regression) or majority class (classification).
        mse: held-out mean squared error (regression only, else NaN).
        y_test, y_pred: held-out targets and predictions, for plotting.
        f1, auroc: held-out F1 and AUROC of a binary classification probe (else NaN).
    """

    model: object
    score: float
    baseline: float
    mse: float
    y_test: np.ndarray
    y_pred: np.ndarray
    f1: float = float("nan")
    auroc: float = float("nan")


def _numpy(value: Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().float().numpy() if isinstance(value, Tensor) else np.asarray(value)


def fit_probe(features: Float[Tensor, "n d"] | np.ndarray, targets: Shaped[Tensor, " n"] | np.ndarray, *,
              kind: str = "regression", test_size: float = 0.3, seed: int = 0,
              groups: Shaped[Tensor, " n"] | np.ndarray | None = None, **estimator_kwargs) -> ProbeResult:
    """Fit a linear probe `features [n, d] -> targets [n]` on a seeded train/test split and score it held out.

    `kind="regression"` uses LinearRegression (score R^2); `kind="classification"` uses LogisticRegression
    (score accuracy; pass e.g. `l1_ratio=1.0, solver="liblinear", C=0.1` for a sparse (L1) probe).
    `groups [n]` (e.g. the document of each token) splits by group, so no group is in both train and test.
    """
    if kind not in {"regression", "classification"}:
        raise ValueError(f"kind must be 'regression' or 'classification', got {kind!r}")
    X, y = _numpy(features), _numpy(targets)
    if len(X) != len(y):
        raise ValueError(f"features have {len(X)} rows but targets {len(y)}")
    if groups is None:
        X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed)
    else:
        from sklearn.model_selection import GroupShuffleSplit

        splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        train_index, test_index = next(splitter.split(X, y, _numpy(groups)))
        X_train, X_test, y_train, y_test = X[train_index], X[test_index], y[train_index], y[test_index]
    if kind == "regression":
        model = LinearRegression(**estimator_kwargs).fit(X_train, y_train)
        y_pred = model.predict(X_test)
        baseline_pred = np.full_like(y_test, y_train.mean(), dtype=float)
        return ProbeResult(model, float(r2_score(y_test, y_pred)), float(r2_score(y_test, baseline_pred)),
                           float(mean_squared_error(y_test, y_pred)), y_test, y_pred)
    model = LogisticRegression(max_iter=2000, random_state=seed, **estimator_kwargs).fit(X_train, y_train)
    y_pred = model.predict(X_test)
    values, counts = np.unique(y_train, return_counts=True)
    majority = np.full_like(y_test, values[counts.argmax()])
    f1 = auc = float("nan")
    if len(values) == 2 and len(np.unique(y_test)) == 2:
        from sklearn.metrics import f1_score, roc_auc_score

        f1 = float(f1_score(y_test, y_pred, pos_label=values[1]))
        auc = float(roc_auc_score(y_test, model.predict_proba(X_test)[:, 1]))
    return ProbeResult(model, float(accuracy_score(y_test, y_pred)), float(accuracy_score(y_test, majority)),
                       float("nan"), y_test, y_pred, f1, auc)


def correlations(activations: Float[Tensor, "n neurons"], target: Float[Tensor, " n"]) -> Float[Tensor, " neurons"]:
    """Pearson correlation of each neuron with a target.

    Args:
        activations: `[n_examples, n_neurons]`.
        target: `[n_examples]`.
    Returns:
        `[n_neurons]`; 0 for constant (dead) neurons instead of NaN.
    """
    acts = activations.double() - activations.double().mean(0)
    centred = target.double() - target.double().mean()
    denominator = acts.norm(dim=0) * centred.norm()
    r = (acts * centred[:, None]).sum(0) / denominator
    return torch.where(denominator > 0, r, torch.zeros_like(r)).to(activations.dtype)


@dataclass
class LinearFit:
    """In-sample least-squares fit `targets ~ features @ coef + intercept`."""

    r2: float
    coef: np.ndarray
    intercept: float


def linear_fit(features: Float[Tensor, "n *d"] | np.ndarray, targets: Float[Tensor, " n"] | np.ndarray) -> LinearFit:
    """Least-squares fit of `targets [n]` on `features [n, d]` (or `[n]`) over all rows, with its R^2."""
    X, y = _numpy(features), _numpy(targets)
    X = X.reshape(len(X), -1)
    model = LinearRegression().fit(X, y)
    return LinearFit(float(r2_score(y, model.predict(X))), model.coef_, float(model.intercept_))


# ---------------------------------------------------------------------------------------------------------------
# Streaming activation statistics and single-neuron classifiers
# ---------------------------------------------------------------------------------------------------------------

class RunningStats:
    """Per-column count, mean and variance over rows seen so far (Chan/Welford merge, float64), plus min and max.

    `update(x [n, *shape])` adds n rows; `mean`, `var`, `std` are `[*shape]`. Memory is O(shape), not O(rows).
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None
        self.min: Tensor | None = None
        self.max: Tensor | None = None

    def update(self, x: Float[Tensor, "n *shape"]) -> "RunningStats":
        x = x.detach().double()
        n = x.shape[0]
        if n == 0:
            return self
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        if self._mean is None:
            self.count, self._mean, self._m2 = n, batch_mean, batch_m2
            self.min, self.max = x.min(0).values, x.max(0).values
            return self
        total = self.count + n
        delta = batch_mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total
        self.min = torch.minimum(self.min, x.min(0).values)
        self.max = torch.maximum(self.max, x.max(0).values)
        return self

    @property
    def mean(self) -> Float[Tensor, "*shape"]:
        if self._mean is None:
            raise ValueError("no rows seen yet")
        return self._mean

    @property
    def var(self) -> Float[Tensor, "*shape"]:
        """Population variance (ddof=0)."""
        if self._m2 is None:
            raise ValueError("no rows seen yet")
        return self._m2 / self.count

    @property
    def std(self) -> Float[Tensor, "*shape"]:
        return self.var.sqrt()


def best_threshold_f1(scores: Float[Tensor, " n"], labels: Shaped[Tensor, " n"]) -> tuple[float, float]:
    """Exact F1 (positive class = label 1) of the best rule `score >= t`, and that threshold.

    Args:
        scores: `[n]` one neuron's activations. labels: `[n]` 0/1.
    """
    scores, labels = scores.detach().double().flatten(), labels.detach().flatten().bool()
    order = torch.argsort(scores, descending=True)
    s, y = scores[order], labels[order].double()
    tp = torch.cumsum(y, 0)
    predicted = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # only cut between distinct scores: keep the last index of each run of ties
    last_of_run = torch.ones_like(s, dtype=torch.bool)
    last_of_run[:-1] = s[:-1] != s[1:]
    f1 = 2 * tp / (predicted + y.sum())
    f1 = torch.where(last_of_run, f1, torch.zeros_like(f1))
    best = int(f1.argmax())
    return float(f1[best]), float(s[best])


def auroc(scores: Float[Tensor, " n"], labels: Shaped[Tensor, " n"]) -> float:
    """Exact area under the ROC curve of `scores [n]` for `labels [n]` (ties count half), as scikit-learn's."""
    scores, labels = scores.detach().double().flatten(), labels.detach().flatten().bool()
    ranks = _average_ranks(scores)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both classes")
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: Tensor) -> Tensor:
    sorted_values, order = torch.sort(values)
    ranks = torch.empty_like(values)
    n = len(values)
    positions = torch.arange(1, n + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    starts = ends - counts.double() + 1
    ranks[order] = ((starts + ends) / 2)[inverse]
    del positions
    return ranks


@dataclass
class NeuronClassifierScores:
    """Every neuron of a stack of layers scored as a one-feature classifier of a binary label.

    Shapes are `[n_layers, n_neurons]` (layers in the order given to the scan).

    Attributes:
        layers: the layer index of each row.
        f1: F1 of the best threshold, in the better direction (`direction=+1`: label 1 when activation >= threshold;
            `-1`: label 1 when activation <= threshold).
        threshold, direction: that rule.
        auroc: area under the ROC curve of the raw activation (0.5 chance; < 0.5 = fires more on label 0).
        mean_pos, mean_neg, std_pos, std_neg: activation statistics per class.
        n_pos, n_neg: number of tokens per class.
    """

    layers: list[int]
    f1: Float[Tensor, "layer neuron"]
    threshold: Float[Tensor, "layer neuron"]
    direction: Int[Tensor, "layer neuron"]
    auroc: Float[Tensor, "layer neuron"]
    mean_pos: Float[Tensor, "layer neuron"]
    mean_neg: Float[Tensor, "layer neuron"]
    std_pos: Float[Tensor, "layer neuron"]
    std_neg: Float[Tensor, "layer neuron"]
    n_pos: int
    n_neg: int

    def ranking(self, k: int | None = None, by: str = "f1") -> list[tuple[int, int, float]]:
        """The `k` best `(layer, neuron, score)` by `by` ("f1", or "auroc" meaning |auroc - 0.5|)."""
        values = self.f1 if by == "f1" else (self.auroc - 0.5).abs()
        flat = values.flatten()
        top = torch.argsort(flat, descending=True)[: k if k is not None else len(flat)]
        n = values.shape[1]
        return [(self.layers[int(i) // n], int(i) % n, float(self.f1.flatten()[i] if by == "f1" else
                                                             self.auroc.flatten()[i])) for i in top]


class NeuronClassifierAccumulator:
    """Streaming F1-of-best-threshold and AUROC for many neurons at once, from per-class activation histograms.

    Each neuron's activations are binned into `bins` equal bins spanning `[low, high]` (values outside are clipped
    into the end bins). A neuron's range is fixed from the first update that sees it (its min/max, widened by
    `margin` of the span on each side) unless given. Thresholds are bin edges, so F1 and AUROC are exact up to the
    bin width. State: `2 * n_neurons * bins` int32 counts and per-class sums, independent of the number of tokens;
    each update works on `COLUMNS` neurons at a time in float32, so its scratch memory is `n_tokens * COLUMNS`.
    """

    COLUMNS = 2048

    def __init__(self, shape: tuple[int, ...], bins: int = 512, low: Float[Tensor, "*shape"] | None = None,
                 high: Float[Tensor, "*shape"] | None = None, margin: float = 0.5):
        self.shape, self.bins, self.margin = tuple(shape), bins, margin
        n = int(np.prod(shape))
        self.counts = torch.zeros(2, n, bins, dtype=torch.int32)                 # [class, neuron, bin]
        self.low = torch.full((n,), float("nan")) if low is None else low.detach().float().flatten()
        self.high = torch.full((n,), float("nan")) if high is None else high.detach().float().flatten()
        self.total = torch.zeros(2, n, dtype=torch.float64)                      # [class, neuron]: tokens seen
        self.sums = torch.zeros(2, 2, n, dtype=torch.float64)                    # [class, power 1/2, neuron]

    def update(self, activations: Float[Tensor, "n_tokens ..."], labels: Shaped[Tensor, " n_tokens"],
               first_column: int = 0) -> "NeuronClassifierAccumulator":
        """activations: `[n_tokens, *shape]`, or `[n_tokens, k]`: the flattened neurons `first_column` to
        `first_column + k` (e.g. one layer of a stack); labels: `[n_tokens]` 0/1."""
        x = activations.detach().reshape(activations.shape[0], -1)
        labels = labels.detach().flatten().bool().to(x.device)
        for start in range(0, x.shape[1], self.COLUMNS):
            columns = slice(first_column + start, first_column + min(start + self.COLUMNS, x.shape[1]))
            self._update_columns(x[:, start:start + self.COLUMNS].float().cpu(), labels.cpu(), columns)
        return self

    def _update_columns(self, x: Tensor, labels: Tensor, columns: slice) -> None:
        unset = self.low[columns].isnan()
        if unset.any():
            lo, hi = x.min(0).values, x.max(0).values
            span = (hi - lo).clamp_min(1e-6)
            self.low[columns] = torch.where(unset, lo - self.margin * span, self.low[columns])
            self.high[columns] = torch.where(unset, hi + self.margin * span, self.high[columns])
        low = self.low[columns]
        width = (self.high[columns] - low).clamp_min(1e-12) / self.bins
        index = ((x - low) / width).floor_().clamp_(0, self.bins - 1).long()      # [n_tokens, k]
        k = x.shape[1]
        index += torch.arange(k) * self.bins
        for cls, rows in ((1, labels), (0, ~labels)):
            if rows.any():
                counts = torch.bincount(index[rows].flatten(), minlength=k * self.bins).view(k, self.bins)
                self.counts[cls, columns] += counts.to(torch.int32)
                values = x[rows].double()
                self.total[cls, columns] += len(values)
                self.sums[cls, 0, columns] += values.sum(0)
                self.sums[cls, 1, columns] += (values ** 2).sum(0)

    def result(self, layers: list[int] | None = None) -> NeuronClassifierScores:
        if self.total.sum() == 0:
            raise ValueError("no data seen yet")
        parts = [self._scores(slice(start, start + self.COLUMNS)) for start in range(0, self.counts.shape[1],
                                                                                      self.COLUMNS)]
        f1, threshold, direction, auroc = (torch.cat(values) for values in zip(*parts))
        mean = self.sums[:, 0] / self.total.clamp_min(1)                          # [class, neuron]
        std = (self.sums[:, 1] / self.total.clamp_min(1) - mean ** 2).clamp_min(0).sqrt()
        rows = self.shape[0] if len(self.shape) == 2 else 1
        shape = (rows, -1)
        return NeuronClassifierScores(
            layers=list(layers) if layers is not None else list(range(rows)),
            f1=f1.reshape(shape).float(), threshold=threshold.reshape(shape).float(),
            direction=direction.reshape(shape), auroc=auroc.reshape(shape).float(),
            mean_pos=mean[1].reshape(shape).float(), mean_neg=mean[0].reshape(shape).float(),
            std_pos=std[1].reshape(shape).float(), std_neg=std[0].reshape(shape).float(),
            n_pos=int(self.total[1, 0]), n_neg=int(self.total[0, 0]))

    def _scores(self, columns: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`(f1, threshold, direction, auroc)` of the neurons in `columns`, from their histograms."""
        pos, neg = self.counts[1, columns].double(), self.counts[0, columns].double()      # [k, bins]
        n_pos, n_neg = pos.sum(1), neg.sum(1)
        # rule "activation >= lower edge of bin b": counts from bin b upwards
        tp_up = pos.flip(1).cumsum(1).flip(1)
        fp_up = neg.flip(1).cumsum(1).flip(1)
        f1_up = 2 * tp_up / (tp_up + fp_up + n_pos[:, None]).clamp_min(1e-12)
        # rule "activation < lower edge of bin b" (b >= 1): counts below bin b
        tp_down = torch.cat([torch.zeros_like(pos[:, :1]), pos.cumsum(1)[:, :-1]], 1)
        fp_down = torch.cat([torch.zeros_like(neg[:, :1]), neg.cumsum(1)[:, :-1]], 1)
        f1_down = 2 * tp_down / (tp_down + fp_down + n_pos[:, None]).clamp_min(1e-12)
        best_up, arg_up = f1_up.max(1)
        best_down, arg_down = f1_down.max(1)
        low, high = self.low[columns].double(), self.high[columns].double()
        width = (high - low) / self.bins
        up_better = best_up >= best_down
        threshold = low + width * torch.where(up_better, arg_up, arg_down).double()
        # AUROC: P(pos > neg) + 0.5 P(same bin)
        neg_below = torch.cat([torch.zeros_like(neg[:, :1]), neg.cumsum(1)[:, :-1]], 1)
        area = (pos * (neg_below + 0.5 * neg)).sum(1) / (n_pos * n_neg).clamp_min(1e-12)
        return torch.where(up_better, best_up, best_down), threshold, torch.where(up_better, 1, -1), area


def mlp_activations(model: Model, tokens: Int[Tensor, "batch pos"], layers: Sequence[int], *, hook: str = "post",
                    fwd_hooks: Sequence = (), neurons: Int[Tensor, " neurons"] | Sequence[int] | None = None
                    ) -> dict[int, Float[Tensor, "batch pos neurons"]]:
    """MLP activations `{layer: [batch, pos, d_mlp]}` (or `[batch, pos, len(neurons)]`) of one forward pass.

    `fwd_hooks` (TransformerLens `(name, fn)` pairs, e.g. an ablation) are applied during the pass. Only the asked
    layers (and neuron columns) are kept, and the pass stops after the last of them. It starts at a clean run
    `replay.keep_clean_block_inputs` kept, where it can.
    """
    captured: dict[int, Tensor] = {}

    def make_capture(layer: int):
        def capture(value, hook):
            kept = value if neurons is None else value[..., torch.as_tensor(neurons, device=value.device)]
            captured[layer] = kept.detach().clone()
        return capture

    hooks = list(fwd_hooks) + [(hook_name("neuron", layer, hook), make_capture(layer)) for layer in layers]
    if kept_run_available(model, tokens, hooks):     # start at the kept clean run's block
        return mlp_activations_each(model, tokens, layers, [fwd_hooks], hook=hook, neurons=neurons)[0]
    with torch.no_grad():   # the blocks after the last layer read, and the unembedding, are not run
        run_with_hooks(model, tokens, fwd_hooks=hooks, return_type=None,
                             stop_at_layer=layers_needed([hook_name("neuron", layer, hook) for layer in layers]))
    return captured


def mlp_activations_each(model: Model, tokens: Int[Tensor, "batch pos"], layers: Sequence[int],
                         variants: Sequence[Sequence], *, hook: str = "post",
                         neurons: Int[Tensor, " neurons"] | Sequence[int] | None = None
                         ) -> list[dict[int, Float[Tensor, "batch pos neurons"]]]:
    """`mlp_activations` under each of `variants` (lists of forward hooks; `[]` for the clean run), sharing the
    blocks before each variant's first hooked or read block (`replay.replayed_runs`): `[{layer: [batch, pos,
    d_mlp or len(neurons)]}]`, one dict per variant."""
    captured: list[dict[int, Tensor]] = [{} for _ in variants]
    columns = None if neurons is None else torch.as_tensor(neurons, device=tokens.device)

    def capture(index: int, layer: int):
        def hook(value, hook=None):  # noqa: ARG001
            captured[index][layer] = (value if columns is None else value[..., columns]).detach().clone()
        return hook

    runs = [list(hooks) + [(hook_name("neuron", layer, hook), capture(index, layer)) for layer in layers]
            for index, hooks in enumerate(variants)]
    for _ in replayed_runs(model, tokens, runs):
        pass
    return captured


def scan_neurons(model: Model,
                 batches: Iterable[tuple[Int[Tensor, "b pos"], Shaped[Tensor, "b pos"], Shaped[Tensor, "b ..."]]],
                 layers: Sequence[int] | None = None, *, hook: str = "post", fwd_hooks: Sequence = (), bins: int = 512,
                 low: Float[Tensor, "layer d_mlp"] | None = None, high: Float[Tensor, "layer d_mlp"] | None = None
                 ) -> NeuronClassifierScores:
    """Score every MLP neuron of `layers` as a classifier of a per-token binary label, streaming over batches.

    Args:
        batches: `(tokens [b, pos], mask [b, pos] bool — which positions count, labels [b] or [b, pos])`.
        layers: default all layers.
        low, high: optional `[n_layers, d_mlp]` histogram ranges (default: from the first batch).
    Returns:
        `NeuronClassifierScores` with `[len(layers), d_mlp]` tensors. Only `[n_layers, d_mlp]`-sized state and
        one batch of activations are held in memory.
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    accumulator: NeuronClassifierAccumulator | None = None
    for tokens, mask, labels in batches:
        acts = mlp_activations(model, tokens, layers, hook=hook, fwd_hooks=fwd_hooks)   # {layer: [b, pos, d_mlp]}
        mask = mask.bool().to(acts[layers[0]].device)
        token_labels = (labels[:, None].expand_as(mask) if labels.dim() == 1 else labels).to(mask.device)[mask]
        d_mlp = acts[layers[0]].shape[-1]
        if accumulator is None:
            accumulator = NeuronClassifierAccumulator((len(layers), d_mlp), bins=bins, low=low, high=high)
        for row, layer in enumerate(layers):
            accumulator.update(acts.pop(layer)[mask], token_labels, first_column=row * d_mlp)  # [tokens, d_mlp]
    if accumulator is None:
        raise ValueError("no batches")
    return accumulator.result(layers)


def activation_difference_stats(model: Model, batches: Iterable[tuple[Int[Tensor, "b pos"], Shaped[Tensor, "b pos"]]],
                                layers: Sequence[int], hooks_a: Sequence, hooks_b: Sequence, *, hook: str = "post"
                                ) -> dict[int, RunningStats]:
    """Streaming per-neuron mean and std of `activation(run with hooks_a) - activation(run with hooks_b)`.

    Args:
        batches: `(tokens [b, pos], mask [b, pos])`; only masked positions are counted.
    Returns:
        `{layer: RunningStats}` whose `mean`/`std` are `[d_mlp]`.
    """
    stats = {layer: RunningStats() for layer in layers}
    for tokens, mask in batches:
        a, b = mlp_activations_each(model, tokens, layers, [hooks_a, hooks_b], hook=hook)
        mask = mask.bool().to(tokens.device)
        for layer in layers:
            stats[layer].update((a[layer] - b[layer])[mask].cpu())
    return stats


def neuron_mean_activations(model: Model, batches: Iterable[tuple[Int[Tensor, "b pos"], Shaped[Tensor, "b pos"]]],
                            layer: int, neurons: Sequence[int] | None = None, *, hook: str = "post",
                            fwd_hooks: Sequence = ()) -> RunningStats:
    """Streaming statistics of one layer's neurons (all, or `neurons`) over the masked positions of `batches`."""
    stats = RunningStats()
    for tokens, mask in batches:
        acts = mlp_activations(model, tokens, [layer], hook=hook, fwd_hooks=fwd_hooks, neurons=neurons)[layer]
        stats.update(acts[mask.bool().to(acts.device)].cpu())
    return stats


@dataclass
class TopExamples:
    """The `k` highest values seen, with where they came from: `values [k]`, `batch_index [k]` (row in the
    concatenation of all batches), `position [k]`."""

    values: Float[Tensor, " k"]
    row: Int[Tensor, " k"]
    position: Int[Tensor, " k"]


class TopKAccumulator:
    """Keep the `k` largest entries of a stream of `[b, pos]` score matrices, with their (row, position)."""

    def __init__(self, k: int, largest: bool = True):
        self.k, self.largest, self.rows_seen = k, largest, 0
        self.values = torch.empty(0, dtype=torch.float64)
        self.row = torch.empty(0, dtype=torch.long)
        self.position = torch.empty(0, dtype=torch.long)

    def update(self, scores: Float[Tensor, "b pos"], mask: Shaped[Tensor, "b pos"] | None = None) -> "TopKAccumulator":
        scores = scores.detach().double().cpu()
        if mask is not None:
            fill = -math.inf if self.largest else math.inf
            scores = torch.where(mask.bool().cpu(), scores, torch.full_like(scores, fill))
        b, pos = scores.shape
        rows = torch.arange(b).repeat_interleave(pos) + self.rows_seen
        positions = torch.arange(pos).repeat(b)
        values = torch.cat([self.values, scores.flatten()])
        all_rows, all_pos = torch.cat([self.row, rows]), torch.cat([self.position, positions])
        keep = torch.topk(values, min(self.k, len(values)), largest=self.largest).indices
        keep = keep[torch.isfinite(values[keep])]
        self.values, self.row, self.position = values[keep], all_rows[keep], all_pos[keep]
        self.rows_seen += b
        return self

    def result(self) -> TopExamples:
        return TopExamples(self.values.clone(), self.row.clone(), self.position.clone())


def token_counts(tokens: Int[Tensor, "*shape"], vocab_size: int, mask: Shaped[Tensor, "*shape"] | None = None
                 ) -> Int[Tensor, " vocab"]:
    """Occurrences of each token id (every repeat counts — not document frequency): `[vocab_size]` int64."""
    flat = tokens.flatten() if mask is None else tokens[mask.bool()]
    return torch.bincount(flat.cpu().long(), minlength=vocab_size)


def neuron_unembed_effect(model: Model, layer: int, neuron: int, active: float, inactive: float
                          ) -> Float[Tensor, " vocab"]:
    """Direct effect on the logits of moving neuron `(layer, neuron)` from `inactive` to `active`: `[d_vocab]`.

    `(active - inactive) * W_out[layer, neuron] @ W_U` (the unembedding bias cancels; the final layer norm is
    ignored, as in a direct-logit view). Pass post-GELU values (`W_out` multiplies post-activations).
    """
    w_out = model.W_out[layer, neuron]                       # [d_model]
    return ((active - inactive) * (w_out @ model.W_U)).detach()
