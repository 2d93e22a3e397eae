"""``mvn-core bench-distributed``: the optimizers' step time under FSDP2, per process,
against ``torch.optim.AdamW`` on the same sharded model in the same run, and what
GAN's and NovoGrad's collectives cost.

The command launches itself on ``--nprocs`` processes of this machine with torchrun
(gloo on CPU, NCCL on GPUs, one GPU per process).  Each process builds the same MLP,
shards it with ``fully_shard`` (one unit per layer), computes one set of gradients and
then times ``opt.step()`` alone for every optimizer, each from fresh state (after two
untimed steps, in which ``fused=True`` compiles), the processes started together by a
barrier before each step.  Reported per optimizer:
the median step time of each process, its ratio to AdamW (foreach, torch's default),
the collectives of one step and what they cost: the same all-reduces (sizes and
dtypes recorded during a step) replayed alone, each after a barrier, median time.
The step times include the waiting for the slower process that the collectives
impose; the replayed time is the communication itself.  On a cluster, run the worker
directly: ``torchrun --nproc-per-node=8 -m mvn_core.bench.distributed
--worker``.
"""

from __future__ import annotations

import argparse
import statistics
import time

WARMUP = 2
MODULE = "mvn_core.bench.distributed"  # also when run as __main__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nprocs", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--width", type=int, default=1024, help="MLP width (default 1024)")
    parser.add_argument("--layers", type=int, default=8,
                        help="Linear layers, two tensors each (default 8: 8.4M params)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--timeout", type=float, default=600, help="seconds (default 600)")


def run(args: argparse.Namespace) -> str:
    """Launch the worker on ``args.nprocs`` processes; returns the first process's table."""
    from .launch import torchrun

    output = torchrun(["-m", MODULE, "--worker", *_worker_argv(args)], args.nprocs,
                      timeout=args.timeout)
    return "\n".join(line[len(PREFIX):] for line in output.splitlines()
                     if line.startswith(PREFIX))


PREFIX = "| "  # the lines of the table, told apart from the launcher's messages


def _worker_argv(args):
    return [f"--width={args.width}", f"--layers={args.layers}", f"--steps={args.steps}"]


# ---- the worker (one per process)

def optimizers():
    """The optimizers timed, by label: AdamW first (the reference of the ratios)."""
    import torch

    from mvn_core.adapters import torch as adapters

    return {
        "torch.optim.AdamW (foreach)": lambda p: torch.optim.AdamW(p, lr=1e-3),
        "torch.optim.AdamW (fused)": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        "MVNGrad": lambda p: adapters.MVNGrad(p, lr=1e-3),
        "Adam": lambda p: adapters.Adam(p, lr=1e-3),
        "AdaBelief": lambda p: adapters.AdaBelief(p, lr=1e-3),
        "LaProp": lambda p: adapters.LaProp(p, lr=1e-3),
        "MaxVA": lambda p: adapters.MaxVA(p, lr=1e-3),
        "SGD (momentum)": lambda p: adapters.SGD(p, lr=1e-3, momentum=0.9),
        "NovoGrad": lambda p: adapters.NovoGrad(p, lr=1e-3),
        "MVNGrad + GAN": lambda p: adapters.MVNGrad(p, lr=1e-3, gan=True),
        "SGD + GAN (channel)": lambda p: adapters.SGD(p, lr=1e-3, momentum=0.9,
                                                      gan={"center": "channel"}),
        "MVNGrad fused=True (compiled, on local shards)":
            lambda p: adapters.MVNGrad(p, lr=1e-3, fused=True),
        "MVNGrad foreach=False (pure rule on DTensors)":
            lambda p: adapters.MVNGrad(p, lr=1e-3, foreach=False),
    }


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count()) if cuda \
        else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = _sharded_mlp(args, device)
    rows = []
    for label, make in optimizers().items():
        try:
            rows.append((label, *_measure(model, make, args.steps, device)))
        except Exception as error:  # e.g. a fused AdamW this build lacks: said, not fatal
            rows.append((label, f"{type(error).__name__}: {error}".splitlines()[0][:60]))
    if dist.get_rank() == 0:
        _print_table(args, model, rows, device)
    dist.destroy_process_group()


def _sharded_mlp(args, device):
    import torch
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(args.width, args.width)
                                  for _ in range(args.layers))).to(device)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    x = torch.randn(8, args.width, device=device)
    model(x).pow(2).mean().backward()  # one set of gradients, kept for every step
    return model


def _measure(model, make, steps, device):
    """Each process's median step time (ms), the collectives of one step, and their
    cost (ms) replayed alone."""
    import torch.distributed as dist

    opt = make(model.parameters())
    for _ in range(WARMUP):
        opt.step()
    times = []
    for _ in range(steps):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    with _Collectives() as recorded:
        opt.step()
    replayed = sum(_replay(size, dtype, steps, device) for size, dtype in recorded.sizes)
    medians = [None] * dist.get_world_size()
    dist.all_gather_object(medians, statistics.median(times))
    return medians, len(recorded.sizes), replayed


def _Collectives():
    """A dispatch mode that records the size and dtype of every all-reduce issued while
    it is active (DTensor's collectives are functional all-reduces of local tensors)."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class Collectives(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(t is DTensor for t in types):
                return NotImplemented  # let DTensor turn the operation into collectives
            if func.__name__.startswith("all_reduce"):
                self.sizes.append((args[0].numel(), args[0].dtype))
            return func(*args, **(kwargs or {}))

    return Collectives()


def _replay(size, dtype, repeats, device):
    """The median time (ms) of one all-reduce of ``size`` elements of ``dtype``."""
    import torch
    import torch.distributed as dist

    buffer = torch.zeros(size, dtype=dtype, device=device)
    times = []
    for _ in range(repeats):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        dist.all_reduce(buffer)
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _print_table(args, model, rows, device):
    import torch.distributed as dist

    n = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    backend = dist.get_backend()
    print(f"{PREFIX}FSDP2 on {dist.get_world_size()} processes ({backend}, {device.type}): "
          f"{n:,} float32 params in {tensors} tensors, sharded; "
          f"opt.step() alone, median of {args.steps} steps per process")
    print(f"{PREFIX}{'optimizer':46s} {'ms/step (each process)':>28s} {'x AdamW':>7s} "
          f"{'collectives':>11s} {'their ms':>8s}")
    reference = None
    for label, *values in rows:
        if len(values) == 1:
            print(f"{PREFIX}{label:46s} {values[0]}")
            continue
        medians, collectives, in_collectives = values
        worst = max(medians)
        reference = reference or worst
        each = ", ".join(f"{m:.2f}" for m in medians)
        print(f"{PREFIX}{label:46s} {worst:9.2f} ({each:>16s}) {worst / reference:6.2f} "
              f"{collectives:11d} {in_collectives:8.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mvn-core bench-distributed", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--worker", action="store_true",
                        help="run as one process of the launched job (under torchrun)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
    else:
        print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
