"""Neurons and probes: activation statistics, correlations with a target, and scikit-learn probes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import accuracy_score, mean_squared_error, r2_score
from sklearn.model_selection import train_test_split
from torch import Tensor


@dataclass
class ProbeResult:
    """A fitted probe and its held-out scores.

    Attributes:
        model: the fitted scikit-learn estimator.
        score: R^2 (regression) or accuracy (classification) on the held-out split.
        baseline: the same score for predicting the training mean (regression) or majority class (classification).
        mse: held-out mean squared error (regression only, else NaN).
        y_test, y_pred: held-out targets and predictions, for plotting.
    """

    model: object
    score: float
    baseline: float
    mse: float
    y_test: np.ndarray
    y_pred: np.ndarray


def _numpy(value: Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().float().numpy() if isinstance(value, Tensor) else np.asarray(value)


def fit_probe(features: Tensor | np.ndarray, targets: Tensor | np.ndarray, *, kind: str = "regression",
              test_size: float = 0.3, seed: int = 0, **estimator_kwargs) -> ProbeResult:
    """Fit a linear probe `features [n, d] -> targets [n]` on a seeded train/test split and score it held out.

    `kind="regression"` uses LinearRegression (score R^2); `kind="classification"` uses LogisticRegression
    (score accuracy; pass e.g. `penalty="l1", solver="liblinear", C=0.1` for a sparse probe).
    """
    if kind not in {"regression", "classification"}:
        raise ValueError(f"kind must be 'regression' or 'classification', got {kind!r}")
    X, y = _numpy(features), _numpy(targets)
    if len(X) != len(y):
        raise ValueError(f"features have {len(X)} rows but targets {len(y)}")
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed)
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
    return ProbeResult(model, float(accuracy_score(y_test, y_pred)), float(accuracy_score(y_test, majority)),
                       float("nan"), y_test, y_pred)


def correlations(activations: Tensor, target: Tensor) -> Tensor:
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


def linear_fit(features: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> LinearFit:
    """Least-squares fit of `targets [n]` on `features [n, d]` (or `[n]`) over all rows, with its R^2."""
    X, y = _numpy(features), _numpy(targets)
    X = X.reshape(len(X), -1)
    model = LinearRegression().fit(X, y)
    return LinearFit(float(r2_score(y, model.predict(X))), model.coef_, float(model.intercept_))
