"""The optimizers and the pure rules inside PyTorch's distributed engines, on two
processes (gloo on CPU; the same code runs with NCCL on GPUs): FSDP2 (``fully_shard``,
DTensor parameters), DDP, ``ZeroRedundancyOptimizer`` and ``torch.distributed.checkpoint``.

One ``torchrun`` launch of ``workers/distributed_torch.py`` measures everything against
single-process runs with the same data and writes a report; the tests assert on it.
The single-process halves of the checkpoint checks (a checkpoint saved by one process
and resumed on two, and the reverse) run in this process.  The launch has a time limit,
its processes are ended whatever happens, and its files are removed.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("this PyTorch has no torch.distributed with gloo", allow_module_level=True)

import mvn_core  # noqa: E402
from mvn_core.bench.launch import torchrun  # noqa: E402

WORKER_PATH = Path(__file__).parent / "workers" / "distributed_torch.py"
_spec = importlib.util.spec_from_file_location("distributed_torch_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TIMEOUT = 300  # seconds: about 20 on an idle 2-core machine
FLOAT64 = 1e-10  # float64 agreement with one process (the gradients' sums differ in rounding)
PER_COORDINATE = [n for n in worker.CLASSES if mvn_core.rules[n].per_coordinate]
GAN = {"tensor": 2, "channel": 1}  # collectives per step: the sums, then the squares


@pytest.fixture(scope="module")
def run():
    with tempfile.TemporaryDirectory(prefix="mvn-core-distributed-") as root:
        root = Path(root)
        with warnings.catch_warnings():  # checkpoints of one process say they are
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            worker.one_process_save(root / "one_process")
        torchrun([str(WORKER_PATH), str(root), str(root / "one_process")], nprocs=2,
                 timeout=TIMEOUT)
        report = json.loads((root / "report.json").read_text())
        yield root, report


def _section(run, name):
    section = run[1][name]
    assert "failed" not in section, section.get("failed")
    return section


def _fsdp(run, name, options="{}"):
    return _section(run, "fsdp")[f"{name} {options}"]


@pytest.mark.parametrize("path", ["{}", '{"foreach": false}'], ids=["multi_tensor", "reference"])
@pytest.mark.parametrize("name", list(worker.CLASSES))
def test_fsdp2_gives_the_single_process_parameters(run, name, path):
    record = _fsdp(run, name, path)
    assert record["error"] <= FLOAT64
    # a coordinate's step needs that coordinate alone; NovoGrad's norms: one collective
    assert record["collectives_per_step"] == [0 if mvn_core.rules[name].per_coordinate else 1]


@pytest.mark.parametrize("name", list(worker.CLASSES))
def test_fsdp2_state_is_sharded_like_the_params(run, name):
    record = _fsdp(run, name)
    assert record["state_laid_out_as_params"]
    per_process = record["state_bytes_per_process"]
    assert sum(per_process) == record["state_bytes"] > 0
    # uneven shards (17 rows as 9 and 8, one row as 1 and 0): a little over a half
    assert max(per_process) <= 0.55 * record["state_bytes"]


@pytest.mark.parametrize("name,options,gan", [
    ("mvn", '{"gan": true}', "tensor"), ("mvn", '{"gan": true, "foreach": false}', "tensor"),
    ("novograd", '{"gan": true}', "tensor"), ("sgd", '{"gan": {"center": "channel"}}', "channel"),
])
def test_fsdp2_with_gan(run, name, options, gan):
    record = _fsdp(run, name, options)
    assert record["error"] <= FLOAT64
    assert record["collectives_per_step"] == [GAN[gan] + (not mvn_core.rules[name].per_coordinate)]


@pytest.mark.parametrize("name", ["mvn", "novograd"])
def test_fsdp2_fused(run, name):
    """``fused=True`` compiles per-coordinate rules for the local shards; NovoGrad runs
    the multi-tensor kernels on them, with its norms from one collective."""
    record = _fsdp(run, name, '{"fused": true}')
    assert record["error"] <= FLOAT64
    assert record["collectives_per_step"] == [0 if mvn_core.rules[name].per_coordinate else 1]


@pytest.mark.parametrize("name", [n for n in worker.CLASSES] + ["gan tensor", "gan channel"])
def test_pure_functions_on_dtensors(run, name):
    """The rules on DTensors give the whole tensors' results (NovoGrad's norms and GAN's
    statistics are those of the logical tensors), with a number of collectives that
    does not grow with the number of tensors."""
    record = _section(run, "pure")[name]
    assert record["error"] <= 1e-12
    reduces = not name.startswith("gan") and not mvn_core.rules[name].per_coordinate
    expected = {"gan tensor": GAN["tensor"],
                # per channel, the one matrix sharded over its columns needs its own two
                "gan channel": GAN["channel"] + 2}.get(name, int(reduces))
    assert record["collectives_per_step"] == [expected]
    if reduces or name.startswith("gan"):
        assert record["collectives_per_step_9_tensors"] == [expected]


@pytest.mark.parametrize("name", list(worker.CLASSES))
def test_ddp_and_zero_redundancy_optimizer(run, name):
    ddp = _section(run, "ddp")
    assert ddp[f"ddp {name}"]["error"] <= FLOAT64
    zero = ddp[f"zero {name}"]
    assert zero["error"] <= FLOAT64
    held = zero["params_with_state_per_process"]
    assert sum(held) == zero["params"] and all(0 < h < zero["params"] for h in held)


def test_zero_state_dict_and_add_param_group(run):
    record = _section(run, "ddp")["zero state_dict and add_param_group"]
    assert record["error"] <= FLOAT64
    assert record["resumed_equal"]  # a fresh ZeRO continues bit for bit
    assert record["one_process_error"] <= FLOAT64  # and so does one process
    assert record["rules_in_saved_groups"] == ["mvn"]


@pytest.mark.parametrize("name", list(worker.CLASSES))
def test_checkpoint_resumes_bit_identically(run, name):
    record = _section(run, "checkpoint")[f"2->2 {name}"]
    assert record["state_equal_after_load"]
    assert record["counts"] == [2, 3]  # one parameter was frozen at the first step
    assert record["continued_equal"]


@pytest.mark.parametrize("name", worker.RESUMED)
def test_checkpoint_of_one_process_resumes_on_two(run, name):
    record = _section(run, "checkpoint")[f"1->2 {name}"]
    assert record["state_equal_after_load"] and record["counts"] == [2, 3]
    assert record["error"] <= FLOAT64


@pytest.mark.parametrize("name", worker.RESUMED)
def test_checkpoint_of_two_processes_resumes_on_one(run, name):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        record = worker.one_process_resume(run[0] / "two_processes", name)
    assert record["state_equal_after_load"] and record["counts"] == [2, 3]
    assert record["error"] <= FLOAT64


def test_checkpoint_of_another_rule_is_refused(run):
    refused = _section(run, "checkpoint")["another rule refused"]["refused"]
    assert refused == "this state dict was saved by mvn; Adam runs adam"


def test_distributed_benchmark_runs():
    """``mvn-core bench-distributed`` on a tiny net: one row per optimizer, AdamW first,
    the collectives of NovoGrad and GAN counted."""
    from argparse import Namespace

    from mvn_core.bench import distributed as bench_distributed

    table = bench_distributed.run(Namespace(nprocs=2, width=16, layers=2, steps=1,
                                            timeout=TIMEOUT))
    # label, ms (ms, ms), then: ratio to AdamW, collectives, their ms
    rows = {line[:46].strip(): line.split(")")[-1].split() for line in table.splitlines()[2:]}
    assert list(rows) == list(bench_distributed.optimizers())
    assert rows["torch.optim.AdamW (foreach)"][0] == "1.00"
    assert rows["NovoGrad"][1] == "1" and rows["MVNGrad + GAN"][1] == "2"
    assert rows["MVNGrad"][1] == "0"


def test_fsdp_example_trains_and_resumes():
    example = Path(__file__).parents[1] / "examples" / "fsdp_mvn_grad.py"
    output = torchrun([str(example), "--steps", "60"], nprocs=2, timeout=TIMEOUT)
    losses = [float(line.split()[-1]) for line in output.splitlines() if line.startswith("step")]
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0]
    assert "identical after 20 more steps: True" in output


@pytest.mark.parametrize("name", ["mvn", "novograd"])
def test_fsdp2_a_nan_in_one_process_shard_skips_the_step_on_every_process(run, name):
    record = _section(run, "skip")[name]
    assert record["processes"] == [{"skipped": [1], "unchanged": True}] * 2
    assert record["moved_after"]
