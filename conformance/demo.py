"""The main demo: one classifier trained with MVN-Grad (and Adam) on every backend.

The model (:mod:`.mlp`) and its backward pass are written once against the Array API;
the optimizer is the pure rule.  Every run starts from the same weights and sees the
same batches, so the runs differ only by the backend's arithmetic: the report shows
how far each one ends from the NumPy float64 run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

import mvn_core
from mvn_core import backends

from . import mlp
from .targets import device_name

RULES = ("mvn", "adam")


@dataclass(frozen=True)
class Run:
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
    run: Run
    losses: list
    params: list  # NumPy float64
    train: tuple  # (loss, accuracy)
    test: tuple
    ms_per_step: float
    max_diff: float = field(default=float("nan"))


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


def plan_runs(selected=None) -> list[Run]:
    """NumPy float64 first (the reference), then every installed backend and device."""
    runs = []
    for name in backends.available():
        if selected and name not in selected and name != "numpy":
            continue
        lib = backends.get(name)
        if name == "jax":
            _enable_jax_x64()
        for device in _demo_devices(name, lib):
            supported = lib.dtypes(device)
            for dtype in ("float64", "float32"):
                if dtype in supported:
                    runs.append(Run(name, dtype, device, compiled=name == "jax"))
    return runs


def _demo_devices(name, lib):
    if name == "array_api_strict":
        return [lib.default_device()]
    return lib.devices()


def _enable_jax_x64():
    import jax

    jax.config.update("jax_enable_x64", True)  # lets float64 runs exist; float32 stays float32


def train(rule_name, run, data, init, batches, lr, progress=None) -> Result:
    lib = backends.get(run.backend)
    xp = lib.namespace()
    rule = mvn_core.rules[rule_name]

    def to(a):
        return lib.from_numpy(a, device=run.device, dtype=run.dtype)

    def step(params, state, x, y, batch):
        x, y = xp.take(x, batch, axis=0), xp.take(y, batch, axis=0)
        loss, grads = mlp.loss_and_grads(xp, params, x, y)
        updates, state = rule.update(state, grads, params, lr=lr)
        return mvn_core.apply_updates(params, updates), state, loss

    if run.compiled:
        step = lib.compile(step)
    x_train, y_train = to(data.x_train), to(data.y_train)
    batches = [lib.from_numpy(b, device=run.device) for b in batches]
    params = [to(p) for p in init]
    state = rule.init(params)
    losses = []
    started = None
    for i, batch in enumerate(batches):
        if i == 1:  # the first step compiles where there is a compiler: not timed
            lib.synchronize(losses[0])
            started = time.perf_counter()
        params, state, loss = step(params, state, x_train, y_train, batch)
        losses.append(loss)
        if progress is not None:
            progress(i + 1)
    lib.synchronize(params[0])
    elapsed = time.perf_counter() - started if started is not None else float("nan")
    ms_per_step = 1e3 * elapsed / max(len(batches) - 1, 1)
    evaluate = _numbers(lib, mlp.evaluate(xp, params, x_train, y_train))
    tested = _numbers(lib, mlp.evaluate(xp, params, to(data.x_test), to(data.y_test)))
    return Result(rule_name, run, [float(lib.to_numpy(v)) for v in losses],
                  [lib.to_numpy(p).astype(np.float64) for p in params],
                  evaluate, tested, ms_per_step)


def _numbers(lib, values):
    return tuple(float(lib.to_numpy(v)) for v in values)


def run_demo(steps=400, lr=3e-3, batch_size=64, hidden=32, seed=0, selected=None,
             plot_path="mvn-core-demo.png", show_progress=True, echo=print):
    data = load_digits_data(seed)
    init = mlp.init_params([data.x_train.shape[1], hidden, data.y_train.shape[1]], seed)
    rng = np.random.default_rng(seed + 1)
    batches = [rng.choice(len(data.x_train), batch_size, replace=False) for _ in range(steps)]
    runs = plan_runs(selected)
    echo(f"digits: {len(data.x_train)} train / {len(data.x_test)} test images, MLP "
         f"64-{hidden}-10 (tanh), {steps} steps of {batch_size}, lr={lr}")
    echo(f"backends: {', '.join(sorted({r.backend for r in runs}))}; "
         f"{len(runs) * len(RULES)} runs (rules {', '.join(RULES)})")
    results = []
    for rule in RULES:
        for run in runs:
            started = time.perf_counter()
            with _progress(f"{rule:<5} {run.label}", steps, show_progress) as tick:
                result = train(rule, run, data, init, batches, lr, tick)
            results.append(result)
            echo(f"[{len(results)}/{len(runs) * len(RULES)}] {rule} {run.label}: final batch "
                 f"loss {result.losses[-1]:.4f} ({time.perf_counter() - started:.1f} s)")
    _compare_with_reference(results)
    for line in report_lines(results):
        echo(line)
    if plot_path:
        plot(results, plot_path)
        echo(f"loss curves written to {plot_path}")
    return results


class _progress:
    """A progress bar (tqdm, where installed and the output is a terminal)."""

    def __init__(self, label, total, enabled):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, leave=False, disable=None)
            except ImportError:
                pass

    def __enter__(self):
        return self.tick if self.bar is not None else None

    def tick(self, done):
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _compare_with_reference(results):
    references = {r.rule: r for r in results if r.run.backend == "numpy" and r.run.dtype == "float64"}
    for r in results:
        ref = references[r.rule].params
        r.max_diff = max(float(np.max(np.abs(p - q))) for p, q in zip(r.params, ref))


def report_lines(results):
    width = max(len(r.run.label) for r in results)
    head = (f"{'rule':<5} {'backend':<{width}} {'train loss':>10} {'train acc':>9} {'test loss':>9} "
            f"{'test acc':>8} {'ms/step':>8} {'max |dtheta| vs numpy float64':>30}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.rule:<5} {r.run.label:<{width}} {r.train[0]:>10.4f} {r.train[1]:>9.3f} "
            f"{r.test[0]:>9.4f} {r.test[1]:>8.3f} {r.ms_per_step:>8.3f} {r.max_diff:>30.2e}")
    return lines


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    colours = {"mvn": "tab:blue", "adam": "tab:orange"}
    for rule in RULES:
        runs = [r for r in results if r.rule == rule]
        for i, r in enumerate(runs):
            label = f"{mvn_core.rules[rule].title}: {len(runs)} runs" if i == 0 else None
            left.plot(_smooth(r.losses), color=colours[rule], lw=0.8, label=label)
    left.set(yscale="log", xlabel="step", ylabel="training loss (moving average of 10 steps)",
             title="Training loss; the runs of each rule lie on top of each other")
    left.legend()
    labels = [f"{r.rule} {r.run.label}" for r in results]
    widths = [max(r.max_diff, 1e-18) for r in results]
    bars = right.barh(labels, widths, color=[
        "tab:green" if r.run.dtype == "float64" else "tab:purple" for r in results])
    for bar, r in zip(bars, results):
        reference = r.run.backend == "numpy" and r.run.dtype == "float64"
        text = "reference" if reference else "identical" if r.max_diff == 0 else f"{r.max_diff:.1e}"
        right.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {text}",
                   va="center", fontsize=7)
    right.set(xscale="log", xlim=(1e-18, 1e-2),
              xlabel="largest |parameter difference| from the NumPy float64 run",
              title="Agreement after training (green float64, purple float32)")
    right.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _smooth(values, width=10):
    values = np.asarray(values)
    if len(values) < width:
        return values
    return np.convolve(values, np.ones(width) / width, mode="valid")
