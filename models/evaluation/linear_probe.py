"""Linear probe: logistic regression on frozen features, L2 strength chosen on a validation split.

The validation split is carved (seeded, stratified) from train; the weight decay of a small
sweep that scores best on it is refitted on all of train and reported on test. Features
are standardised with train statistics, so one grid suits backbones whose features differ
in scale (and raw pixels). The fit is full-batch L-BFGS (scipy) on a float32 softmax loss
with its gradient written out (no autograd), so a sweep over a few thousand images takes
seconds on a 2-core CPU; each weight decay starts from the previous solution.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

# Weight decay on the mean cross-entropy; 1e-4 is nearly unregularised, 1e-1 strongly.
DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS,
                 val_fraction: float = 0.2, seed: int = 0, max_iter: int = 100) -> dict[str, float]:
    """Test accuracy of the probe whose weight decay scored best on validation, and that weight decay."""
    x_train = np.asarray(train_features, dtype=np.float32)
    y_train = np.asarray(train_labels, dtype=np.int64)
    x_test = np.asarray(test_features, dtype=np.float32)
    y_test = np.asarray(test_labels, dtype=np.int64)
    if len(np.unique(y_train)) < 2:
        raise ValueError("linear probe: the train split holds fewer than two classes")
    n_classes = int(max(y_train.max(), y_test.max(initial=0))) + 1
    fit_idx, val_idx = _stratified_holdout(y_train, val_fraction, seed)
    best_wd, best_val, start = weight_decays[0], -1.0, None
    # Strongest regularisation first: each solution is a good start for the next, weaker one.
    for wd in sorted(weight_decays, reverse=True):
        probe = _Probe.fit(x_train[fit_idx], y_train[fit_idx], n_classes, wd, max_iter, start)
        start = probe.params
        accuracy = probe.accuracy(x_train[val_idx], y_train[val_idx])
        if accuracy >= best_val:  # ties keep the weaker regularisation
            best_wd, best_val = wd, accuracy
    test_accuracy = _Probe.fit(x_train, y_train, n_classes, best_wd, max_iter).accuracy(x_test, y_test)
    return {"linear_top1": test_accuracy, "linear_val_top1": best_val, "linear_weight_decay": float(best_wd)}


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded ``fraction`` of the items (one at least, when the class has two) for validation."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        val.extend(members[:n_val].tolist())
        fit.extend(members[n_val:].tolist())
    return np.sort(fit), np.sort(val)


class _Probe:
    def __init__(self, mean: np.ndarray, std: np.ndarray, weight: np.ndarray, bias: np.ndarray):
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, n_classes: int, weight_decay: float, max_iter: int,
            start: np.ndarray | None = None) -> _Probe:
        mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
        z = (x - mean) / std  # (N, D) float32
        n, d = z.shape
        onehot = np.eye(n_classes, dtype=np.float32)[y]  # (N, C)

        def loss_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
            w = params[:d * n_classes].reshape(d, n_classes).astype(np.float32)
            logits = z @ w + params[d * n_classes:].astype(np.float32)  # (N, C)
            logits -= logits.max(axis=1, keepdims=True)
            log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            loss = -(onehot * log_p).sum() / n + 0.5 * weight_decay * float((w * w).sum())
            residual = (np.exp(log_p) - onehot) / n  # d loss / d logits, (N, C)
            grad_w = z.T @ residual + weight_decay * w
            return float(loss), np.concatenate([grad_w.ravel(), residual.sum(axis=0)]).astype(np.float64)

        x0 = np.zeros(d * n_classes + n_classes) if start is None else start
        # One BLAS thread: the steps are small, and a thread pool waiting on itself made them up to
        # 30x slower on a busy 2-core machine (measured), against at most 2x lost on a quiet one.
        with threadpool_limits(limits=1, user_api="blas"):
            result = minimize(loss_and_grad, x0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
        w = result.x[:d * n_classes].reshape(d, n_classes).astype(np.float32)
        return cls(mean, std, w, result.x[d * n_classes:].astype(np.float32))

    @property
    def params(self) -> np.ndarray:
        return np.concatenate([self.weight.ravel(), self.bias]).astype(np.float64)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        logits = ((x - self.mean) / self.std) @ self.weight + self.bias
        return float((logits.argmax(axis=1) == y).mean()) if len(y) else 0.0
