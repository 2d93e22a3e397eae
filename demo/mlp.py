"""A small multilayer perceptron written once against the Array API standard.

Forward pass and backward pass (by hand, no autograd) use only standard functions, so
every backend computes the same thing; the demo trains it with the pure rules.
"""

from __future__ import annotations

import numpy as np


def init_params(sizes, seed=0):
    """Weights ~ N(0, 1/fan_in) and zero biases, as float64 NumPy arrays:
    ``[W1, b1, W2, b2, ...]`` for layer sizes ``sizes`` (inputs first)."""
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params += [rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in), np.zeros(fan_out)]
    return params


def _forward(xp, params, x):
    """Hidden activations (tanh) of every layer and the final logits."""
    hidden = [x]
    for w, b in zip(params[0:-2:2], params[1:-2:2]):
        hidden.append(xp.tanh(hidden[-1] @ w + b))
    return hidden, hidden[-1] @ params[-2] + params[-1]


def _log_softmax(xp, logits):
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))


def loss_and_grads(xp, params, x, onehot):
    """Mean softmax cross-entropy on the batch ``x`` and its gradient for every param."""
    hidden, logits = _forward(xp, params, x)
    log_p = _log_softmax(xp, logits)
    n = x.shape[0]
    loss = -xp.sum(onehot * log_p) / n
    delta = (xp.exp(log_p) - onehot) / n  # d loss / d logits
    grads = []
    for layer in range(len(params) // 2 - 1, -1, -1):
        h = hidden[layer]
        grads = [h.T @ delta, xp.sum(delta, axis=0)] + grads
        if layer:
            delta = (delta @ params[2 * layer].T) * (1 - h * h)  # tanh' = 1 - tanh^2
    return loss, grads


def evaluate(xp, params, x, onehot):
    """Mean cross-entropy and accuracy on ``x``."""
    _, logits = _forward(xp, params, x)
    loss = -xp.sum(onehot * _log_softmax(xp, logits)) / x.shape[0]
    hits = xp.argmax(logits, axis=1) == xp.argmax(onehot, axis=1)
    return loss, xp.mean(xp.astype(hits, logits.dtype))
