"""MVN-Grad (:mod:`mvn_core.adapters.torch`) inside the training frameworks people use:
Hugging Face's ``transformers.Trainer`` and PyTorch Lightning.  Each trains a small
model built from a config for a few dozen steps, writes checkpoints, and is resumed
from one: the resumed run must end with the parameters of the uninterrupted one, bit
for bit (the optimizer's state, the schedule and the data order all come back).

``workers/training_frameworks.py`` runs both in a process of its own and prints a
report; the tests assert on it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "workers" / "training_frameworks.py"
TIMEOUT = 600  # seconds: about 30 on a busy 2-core machine
NEEDED = ("torch", "transformers", "accelerate", "lightning")


@pytest.fixture(scope="module")
def report():
    absent = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if absent:
        pytest.skip(f"{', '.join(absent)} not installed")
    out = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mean(values):
    return sum(values) / len(values)


def test_transformers_trainer_trains_checkpoints_and_resumes_exactly(report):
    """``Trainer(..., optimizers=(MVNGrad(...), scheduler))``, 24 steps, checkpoints every
    10; ``train(resume_from_checkpoint=".../checkpoint-10")``."""
    run = report["transformers"]
    losses = run["losses"]
    assert len(losses) == 24 and _mean(losses[-4:]) < 0.25 * _mean(losses[:4])
    assert run["checkpoints"] == ["checkpoint-10", "checkpoint-20", "checkpoint-24"]
    assert run["saved_rule"] == "mvn" and run["saved_steps"] == [10]
    assert run["resumed_losses"] == losses[10:]
    assert run["difference"] == 0.0


def test_lightning_trains_checkpoints_and_resumes_exactly(report):
    """``configure_optimizers`` returns MVNGrad with a step-wise StepLR; 4 epochs of 6
    batches, a checkpoint every epoch; ``fit(..., ckpt_path=".../epoch=1-step=12.ckpt")``."""
    run = report["lightning"]
    losses = run["losses"]
    assert len(losses) == 24 and _mean(losses[-6:]) < 0.5 * _mean(losses[:6])
    assert run["checkpoints"] == [f"epoch={e}-step={6 * (e + 1)}.ckpt" for e in range(4)]
    assert run["saved_rule"] == "mvn" and run["saved_steps"] == [12]
    assert run["saved_lr"] == pytest.approx(1e-2 * 0.5)  # StepLR halved it at step 8
    assert run["resumed_losses"] == losses[12:]
    assert run["difference"] == 0.0
