"""Training the demo's classifier: the data, the records of a run, the training loop,
and the run with the pure functions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

import mvn_core
from mvn_core import backends

from . import mlp
from mvn_core.conformance.targets import device_name


@dataclass(frozen=True)
class TrainingRun:
    backend: str
    dtype: str
    device: object = None
    compiled: bool = False

    @property
    def label(self) -> str:
        path = " jit" if self.compiled else ""
        return f"{self.backend} {device_name(self.device)} {self.dtype}{path}"


@dataclass
class Result:
    rule: str
    run: TrainingRun
    losses: list
    params: list  # NumPy float64
    train: tuple  # (loss, accuracy)
    test: tuple
    ms_per_step: float
    path: str = ""  # "" for the pure functions, else the framework adapter used
    max_diff: float = field(default=float("nan"))  # from the NumPy float64 run
    diff_from_pure: float = field(default=float("nan"))  # adapter runs: from the pure run

    @property
    def label(self) -> str:
        return f"{self.run.label} [{self.path}]" if self.path else self.run.label


@dataclass(frozen=True)
class Data:
    x_train: np.ndarray
    y_train: np.ndarray  # one-hot
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_data(seed: int = 0) -> Data:
    """scikit-learn's bundled 8x8 handwritten digits, scaled to [0, 1], split 80/20."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, onehot = digits.data / 16.0, np.eye(10)[digits.target]
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return Data(x[train], onehot[train], x[test], onehot[test])


def train(rule_name, run, data, init, batches, lr, progress=None) -> Result:
    """Train with the pure functions: model gradients by hand, ``rule.update``."""
    lib = backends.get(run.backend)
    xp = lib.namespace()
    rule = mvn_core.rules[rule_name]

    def step(carry, x, y, batch):
        params, state = carry
        x, y = xp.take(x, batch, axis=0), xp.take(y, batch, axis=0)
        loss, grads = mlp.loss_and_grads(xp, params, x, y)
        updates, state = rule.update(state, grads, params, lr=lr)
        return (mvn_core.apply_updates(params, updates), state), loss

    if run.compiled:
        step = lib.compile(step)
    params = [lib.from_numpy(p, device=run.device, dtype=run.dtype) for p in init]
    (params, _), losses, ms = training_loop(run, step, (params, rule.init(params)), data,
                                            batches, progress)
    return finished(rule_name, run, "", params, losses, ms, data)


def training_loop(run, step, carry, data, batches, progress=None):
    """Run ``step(carry, x, y, batch) -> (carry, loss)`` over the batches (index arrays).

    Returns the last carry, the losses and the milliseconds per step (the first step,
    which compiles where there is a compiler, is not timed)."""
    lib = backends.get(run.backend)
    x_train = lib.from_numpy(data.x_train, device=run.device, dtype=run.dtype)
    y_train = lib.from_numpy(data.y_train, device=run.device, dtype=run.dtype)
    batches = [lib.from_numpy(b, device=run.device) for b in batches]
    losses, started = [], None
    for i, batch in enumerate(batches):
        if i == 1:
            lib.synchronize(losses[0])
            started = time.perf_counter()
        carry, loss = step(carry, x_train, y_train, batch)
        losses.append(loss)
        if progress is not None:
            progress(i + 1)
    lib.synchronize(losses[-1])
    elapsed = time.perf_counter() - started if started is not None else float("nan")
    return carry, [float(lib.to_numpy(v)) for v in losses], 1e3 * elapsed / max(len(batches) - 1, 1)


def finished(rule_name, run, path, params, losses, ms_per_step, data) -> Result:
    """The :class:`Result` of a run ending with ``params`` (arrays of the run's backend,
    in the layout of :func:`mlp.init_params`)."""
    lib = backends.get(run.backend)
    xp = lib.namespace()

    def to(a):
        return lib.from_numpy(a, device=run.device, dtype=run.dtype)

    train_scores = _numbers(lib, mlp.evaluate(xp, params, to(data.x_train), to(data.y_train)))
    test_scores = _numbers(lib, mlp.evaluate(xp, params, to(data.x_test), to(data.y_test)))
    return Result(rule_name, run, losses, [lib.to_numpy(p).astype(np.float64) for p in params],
                  train_scores, test_scores, ms_per_step, path=path)


def _numbers(lib, values):
    return tuple(float(lib.to_numpy(v)) for v in values)


