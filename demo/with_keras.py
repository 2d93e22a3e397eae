"""The demo's Keras runs: the same classifier as a ``keras.Sequential`` model trained with
:class:`mvn_core.adapters.keras.MVNGrad`, on each Keras backend that is installed.

Keras chooses its backend when it is imported, so each backend trains in a process of
its own: :func:`start` launches ``python -m mvn_core.demo.with_keras`` with
``KERAS_BACKEND`` set, handing it the data, the initial weights and the batches in an
``.npz`` file.  The process imports Keras and builds the model at a low priority, while
the demo's other runs train, then waits: :func:`finish` lets it train (in float32, alone,
so that its time per step is its own) and reads its results back as a
:class:`~.training.Result`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BACKENDS = ("jax", "torch", "tensorflow")  # Keras's, by the library each needs
PATH = "keras.Model + adapters.keras.MVNGrad"


def available(selected=None) -> list[str]:
    """The Keras backends that can run here (Keras and the library installed; not
    imported), among ``selected`` if given."""
    if importlib.util.find_spec("keras") is None:
        return []
    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None
            and (selected is None or b in selected)]


def start(backend, folder, data, init, batches, lr) -> subprocess.Popen:
    """Launch the run on ``backend``; its inputs and results live in ``folder``."""
    folder = Path(folder)
    np.savez(folder / f"keras-{backend}-in.npz", x_train=data.x_train, y_train=data.y_train,
             x_test=data.x_test, y_test=data.y_test, batches=np.stack(batches), lr=lr,
             **{f"param{i}": p for i, p in enumerate(init)})
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-m", __name__, str(folder), backend], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process, backend, folder, run):
    """Let a run started by :func:`start` train; its :class:`~.training.Result` (an
    error with the process's last output if it failed)."""
    from .training import Result

    _, stderr = process.communicate(input="train\n")
    if process.returncode != 0:
        raise RuntimeError(f"the Keras run on {backend} failed:\n{stderr[-2000:]}")
    out = np.load(Path(folder) / f"keras-{backend}-out.npz")
    scores = json.loads(str(out["scores"]))
    params = [out[f"param{i}"] for i in range(len(out.files) - 2)]
    return Result("mvn", run, list(out["losses"]), params, tuple(scores["train"]),
                  tuple(scores["test"]), scores["ms_per_step"], path=PATH)


def _train(folder: Path, backend: str) -> None:
    """In the Keras process: build the model at a low priority, wait for the word, then
    train, evaluate and write the results."""
    if hasattr(os, "nice"):
        os.nice(10)  # the demo's other runs are being timed meanwhile
    import keras

    from mvn_core.adapters.keras import MVNGrad

    given = np.load(folder / f"keras-{backend}-in.npz")
    init = [given[f"param{i}"] for i in range(4)]
    model = keras.Sequential([keras.Input((init[0].shape[0],)),
                              keras.layers.Dense(init[0].shape[1], activation="tanh"),
                              keras.layers.Dense(init[2].shape[1])])
    model.set_weights([p.astype(np.float32) for p in init])
    model.compile(optimizer=MVNGrad(learning_rate=float(given["lr"])),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.CategoricalAccuracy()])
    x, y = given["x_train"].astype(np.float32), given["y_train"].astype(np.float32)
    sys.stdin.readline()  # the demo's other runs are done: train alone
    losses, started = [], None
    for i, batch in enumerate(given["batches"]):
        if i == 1:  # the first step compiles
            started = time.perf_counter()
        losses.append(float(model.train_on_batch(x[batch], y[batch])[0]))
    ms = 1e3 * (time.perf_counter() - started) / max(len(losses) - 1, 1) if started else float("nan")
    scores = {"ms_per_step": ms}
    for part in ("train", "test"):
        loss, accuracy = model.evaluate(given[f"x_{part}"].astype(np.float32),
                                        given[f"y_{part}"].astype(np.float32),
                                        batch_size=len(given[f"x_{part}"]), verbose=0)
        scores[part] = [float(loss), float(accuracy)]
    np.savez(folder / f"keras-{backend}-out.npz", losses=np.array(losses),
             scores=json.dumps(scores),
             **{f"param{i}": np.asarray(w, np.float64) for i, w in enumerate(model.get_weights())})


if __name__ == "__main__":
    _train(Path(sys.argv[1]), sys.argv[2])
