"""The main demo: one classifier trained with MVN-Grad (and Adam) on every backend.

The model (:mod:`.mlp`) and its backward pass are written once against the Array API;
the optimizer is the pure rule.  Every run starts from the same weights and sees the
same batches, so the runs differ only by the backend's arithmetic: the report shows
how far each one ends from the NumPy float64 run.
"""

from __future__ import annotations

import math
import tempfile
import time

import numpy as np

import mvn_core
from mvn_core import backends

from . import with_keras as demo_keras
from . import mlp
from .frameworks import JAX_PATH, TORCH_PATH, train_jax_model, train_torch_module
from .training import TrainingRun, load_digits_data, train

NUMPY_FLOAT64 = TrainingRun("numpy", "float64", "cpu")
# The framework adapters the demo trains MVN-Grad with, by the backend they run on.
FRAMEWORKS = {"torch": (TORCH_PATH, train_torch_module), "jax": (JAX_PATH, train_jax_model)}

RULES = ("mvn", "adam")


def plan_runs(selected=None) -> list[TrainingRun]:
    """NumPy float64 first (the reference), then every installed backend (or those
    ``selected``) on each of its devices, in float64 where it has it and float32."""
    known = backends.NAMES + backends.PARTIAL  # TensorFlow: through Keras only
    unknown = set(selected or ()) - set(known)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}; known: {', '.join(known)}")
    runs = []
    for name in backends.available():
        if selected and name not in selected and name != "numpy":
            continue
        lib = backends.get(name)
        for device in _demo_devices(name, lib):
            supported = lib.dtypes(device)
            for dtype in ("float64", "float32"):
                if dtype in supported:
                    runs.append(TrainingRun(name, dtype, device, compiled=name == "jax"))
    return runs


def _demo_devices(name, lib):
    if name == "array_api_strict":
        return [lib.default_device()]
    return lib.devices()


def _enable_jax_x64():
    """JAX has float64 only with x64 on: the demo turns it on so that its float64 runs
    exist."""
    if "jax" in backends.available():
        backends.get("jax").enable_x64()


def run_demo(steps=400, lr=3e-3, batch_size=64, hidden=32, seed=0, selected=None,
             plot_path="mvn-core-demo.png", show_progress=True, echo=print):
    data = load_digits_data(seed)
    init = mlp.init_params([data.x_train.shape[1], hidden, data.y_train.shape[1]], seed)
    rng = np.random.default_rng(seed + 1)
    batches = [rng.choice(len(data.x_train), batch_size, replace=False) for _ in range(steps)]
    _enable_jax_x64()
    runs = plan_runs(selected)
    jobs = plan_jobs(runs)
    keras_backends = demo_keras.available(selected)
    echo(f"digits: {len(data.x_train)} train / {len(data.x_test)} test images, MLP "
         f"64-{hidden}-10 (tanh), {steps} steps of {batch_size}, lr={lr}")
    echo(f"backends: {', '.join(sorted({r.backend for r in runs}))}; "
         f"{len(jobs) + len(keras_backends)} runs: rules {', '.join(RULES)} through the pure "
         "functions, MVN-Grad through the adapters"
         + (f" (Keras on {', '.join(keras_backends)})" if keras_backends else ""))
    results = []
    with tempfile.TemporaryDirectory() as folder:
        # Keras starts in processes of its own (one per backend), while the others train
        keras_runs = {b: demo_keras.start(b, folder, data, init, batches, lr)
                      for b in keras_backends}
        for rule, run, trainer, path in jobs:
            label = f"{rule} {run.label}{f' [{path}]' if path else ''}"
            started = time.perf_counter()
            with _progress(label, steps, show_progress) as tick:
                results.append(trainer(rule, run, data, init, batches, lr, tick))
            _done(echo, results, len(jobs) + len(keras_runs), label, started)
        for backend, process in keras_runs.items():
            run = _keras_run(backend, runs)
            started = time.perf_counter()
            results.append(demo_keras.finish(process, backend, folder, run))
            _done(echo, results, len(jobs) + len(keras_runs),
                  f"mvn {run.label} [{demo_keras.PATH}]", started)
    _compare(results)
    for line in report_lines(results):
        echo(line)
    if plot_path:
        plot(results, plot_path)
        echo(f"loss curves written to {plot_path}")
    return results


def _done(echo, results, total, label, started):
    echo(f"[{len(results)}/{total}] {label}: final batch loss {results[-1].losses[-1]:.4f} "
         f"({time.perf_counter() - started:.1f} s)")


def _keras_run(backend, runs):
    """The run a Keras run on ``backend`` matches: that library's float32 pure run (on
    its first device, jitted for JAX as Keras jits), or a run of its own (TensorFlow,
    which has no pure run here: its namespace holds only what the rules use)."""
    for run in runs:
        if run.backend == backend and run.dtype == "float32":
            return run
    return TrainingRun(backend, "float32", "CPU:0")


def plan_jobs(runs):
    """(rule, run, trainer, path): every rule through the pure functions on every run,
    then MVN-Grad through each framework adapter on that framework's runs."""
    jobs = [(rule, run, train, "") for rule in RULES for run in runs]
    for run in runs:
        if run.backend in FRAMEWORKS:
            path, trainer = FRAMEWORKS[run.backend]
            jobs.append(("mvn", run, trainer, path))
    return jobs


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


def _compare(results):
    """Each run's largest parameter difference from NumPy float64 and, for an adapter
    run, from the pure-function run of the same rule, backend, device and dtype."""
    pure = {(r.rule, r.run): r for r in results if not r.path}
    for r in results:
        r.max_diff = _largest_difference(r, pure[(r.rule, NUMPY_FLOAT64)])
        if r.path and (r.rule, r.run) in pure:
            r.diff_from_pure = _largest_difference(r, pure[(r.rule, r.run)])


def _largest_difference(a, b):
    return max(float(np.max(np.abs(p - q), initial=0.0)) for p, q in zip(a.params, b.params))


def report_lines(results):
    width = max(len(r.label) for r in results)
    head = (f"{'rule':<5} {'run':<{width}} {'train loss':>10} {'train acc':>9} {'test loss':>9} "
            f"{'test acc':>8} {'ms/step':>8} {'max |dtheta| from: numpy float64':>33} "
            f"{'pure run':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.rule:<5} {r.label:<{width}} {r.train[0]:>10.4f} {r.train[1]:>9.3f} "
            f"{r.test[0]:>9.4f} {r.test[1]:>8.3f} {r.ms_per_step:>8.3f} {r.max_diff:>33.2e} "
            f"{_from_pure(r):>9}")
    return lines


def _from_pure(result):
    """The "pure run" column: blank for a pure run, "-" for an adapter run without a
    pure run of its library (Keras on TensorFlow)."""
    if not result.path:
        return ""
    return "-" if math.isnan(result.diff_from_pure) else f"{result.diff_from_pure:.2e}"


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
    labels = [f"{r.rule} {r.label}" for r in results]
    widths = [max(r.max_diff, 1e-18) for r in results]
    bars = right.barh(labels, widths, color=[
        "tab:green" if r.run.dtype == "float64" else "tab:purple" for r in results])
    for bar, r in zip(bars, results):
        reference = r.run == NUMPY_FLOAT64 and not r.path
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
