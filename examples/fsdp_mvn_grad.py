"""Train a small MLP with MVN-Grad under FSDP2, then checkpoint and resume it.

    torchrun --nproc-per-node=2 examples/fsdp_mvn_grad.py            # 2 CPU processes, gloo
    torchrun --nproc-per-node=8 examples/fsdp_mvn_grad.py            # 8 GPUs, NCCL

``fully_shard`` turns each layer's parameters into DTensors split over the processes;
``MVNGrad`` is used exactly as on one device.  Its state (m, v, u) is made from the
sharded parameters, so each process keeps only its shards' state.  The data is a
teacher network's outputs; each process takes its part of every batch, so the run
computes the same steps as one process on the whole batches would.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

from mvn_core.adapters.torch import MVNGrad


def mlp(device):
    torch.manual_seed(0)  # the same initial weights on every process
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 1)).to(device)


def sharded_mlp(device):
    model = mlp(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)  # one all-gather per layer in forward, reduce-scatter in backward
    return fully_shard(model)


def batches(steps, device, size=64, seed=1):
    """The same batches on every process: inputs and a fixed teacher's outputs."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 1, generator=generator) / 4
    for _ in range(steps):
        x = torch.randn(size, 16, generator=generator)
        yield x.to(device), torch.sin(x @ teacher).to(device)


def train(model, opt, data, rank, world, log_every=0):
    for step, (x, y) in enumerate(data, start=1):
        mine = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[mine]), y[mine])
        loss.backward()  # FSDP2 averages the gradients over the processes
        opt.step()
        if log_every and (step == 1 or step % log_every == 0):
            total = loss.detach().clone()
            dist.all_reduce(total)
            if rank == 0:
                print(f"step {step:4d}  loss {float(total) / world:.5f}", flush=True)


def state_bytes(opt):
    """Bytes of optimizer state this process holds (its shards)."""
    return sum(t.to_local().numel() * t.element_size()
               for state in opt.state.values() for t in state.values() if t.ndim)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"

    model = sharded_mlp(device)
    opt = MVNGrad(model.parameters(), lr=args.lr, weight_decay=0.01)
    train(model, opt, batches(args.steps, device), rank, world, log_every=max(1, args.steps // 6))
    held = [None] * world
    dist.all_gather_object(held, state_bytes(opt))
    if rank == 0:
        print(f"optimizer state per process: {held} bytes")

    # Checkpoint the sharded state, resume it into a fresh model and optimizer (on any
    # number of processes), and check that both continue identically.
    # (One machine: the folder is made by rank 0 and shared by path.)
    folder = [tempfile.mkdtemp(prefix="mvn-core-example-") if rank == 0 else None]
    dist.broadcast_object_list(folder)
    try:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=folder[0])
        resumed = sharded_mlp(device)
        opt_resumed = MVNGrad(resumed.parameters(), lr=args.lr, weight_decay=0.01)
        state = {"model": get_model_state_dict(resumed),
                 "optim": get_optimizer_state_dict(resumed, opt_resumed)}
        dcp.load(state, checkpoint_id=folder[0])
        set_model_state_dict(resumed, state["model"])
        set_optimizer_state_dict(resumed, opt_resumed, state["optim"])
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(folder[0], ignore_errors=True)
    train(model, opt, batches(20, device, seed=2), rank, world)
    train(resumed, opt_resumed, batches(20, device, seed=2), rank, world)
    same = all(torch.equal(a.full_tensor(), b.full_tensor())
               for a, b in zip(model.parameters(), resumed.parameters()))
    if rank == 0:
        print(f"resumed from the checkpoint: identical after 20 more steps: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
