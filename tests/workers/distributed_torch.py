"""The multi-process half of ``tests/test_distributed_torch.py``.

Run by ``torchrun`` on two processes (gloo on CPU; the same code runs with NCCL).
Every check measures and records; the test asserts.  Rank 0 writes the records as
JSON to ``OUT/report.json``; ``OUT/two_processes/`` receives a checkpoint saved by
the two processes, for the test to resume on one.

    torchrun --nproc-per-node=2 distributed_torch.py OUT ONE_PROCESS_CHECKPOINT

The single-process references are computed here too, on every process alike, from
the same seeds; the test imports this module for its own single-process runs.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from copy import deepcopy
from datetime import timedelta

import torch
import torch.distributed as dist

import mvn_core
from mvn_core.adapters import torch as adapters
from mvn_core.conformance.paths import torch_arguments

CLASSES = dict(adapters.OPTIMIZERS)
HYPER = {"lr": 1e-2, "weight_decay": 0.1}


def _arguments(name):
    """Each rule also in its last checked setting (SGD with momentum, AdaBelief
    rectified, ...), in the names of its torch class (its betas as ``betas``)."""
    settings = mvn_core.rules[name].settings
    extra = {k: v for k, v in (settings[-1] if settings else {}).items() if k not in HYPER}
    return torch_arguments(CLASSES[name], extra)


EXTRA = {name: _arguments(name) for name in CLASSES}
STEPS, BATCH = 4, 8
RESUMED = ("mvn", "novograd")  # the rules checkpointed across process counts


# ---- the model, the data and training: shared by both halves of the test

def make_net() -> torch.nn.Sequential:
    """A small float64 net whose tensors shard unevenly over two processes (17 rows:
    9 and 8; one row: one process holds an empty shard), with 1-d LayerNorm params."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 17),
        torch.nn.LayerNorm(17), torch.nn.Tanh(), torch.nn.Linear(17, 1)).double()


def make_deep_net() -> torch.nn.Sequential:
    """Sixteen tensors of more than one entry on each process: enough for
    ``fused=True`` to compile its kernel (smaller batches run eagerly)."""
    torch.manual_seed(0)
    hidden = [layer for _ in range(7) for layer in (torch.nn.Linear(8, 8), torch.nn.Tanh())]
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), *hidden,
                               torch.nn.Linear(8, 1)).double()


def make_optimizer(name, params, **options):
    return CLASSES[name](params, **HYPER, **EXTRA.get(name, {}), **options)


def batches(steps=STEPS, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 6, generator=generator, dtype=torch.float64),
             torch.randn(BATCH, 1, generator=generator, dtype=torch.float64))
            for _ in range(steps)]


def train(model, opt, data, part=lambda t: t, frozen=()):
    """Steps on ``data``, each process on its ``part`` of every batch (the loss is a
    mean, so averaging the processes' gradients gives the whole batch's).  Params in
    ``frozen`` get no gradient at the first step (their counts lag behind)."""
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(part(x)), part(y)).backward()
        if step == 0:
            for p in frozen:
                p.grad = None
        opt.step()


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def distance(params, reference) -> float:
    """The largest difference of the parameters, relative to each tensor's scale."""
    return max(float((full(p.detach()) - q.detach()).abs().max() / max(1.0, q.abs().max()))
               for p, q in zip(params, reference) if q.numel())


def reference_net(name, data=None, net=make_net, **options):
    """One process, the unsharded net, the whole batches."""
    model = net()
    train(model, make_optimizer(name, model.parameters(), **options), data or batches())
    return model


# ---- the checks (multi-process)

def rank():
    return dist.get_rank()


def world():
    return dist.get_world_size()


def my_part(t):
    return t.chunk(world())[rank()]


def sharded_net(net=make_net):
    from torch.distributed.fsdp import fully_shard

    model = net()
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    return fully_shard(model)


def collectives(run):
    """The number of collectives ``run()`` issues (DTensor's and torch.distributed's)."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        run()
    return mode.get_total_counts()


def fsdp_runs():
    """Every optimizer on an FSDP2-sharded net against one process: parameters, the
    collectives of each step and how the state is laid out."""
    configs = [(name, {}) for name in CLASSES]
    configs += [(name, {"foreach": False}) for name in CLASSES]
    configs += [("mvn", {"gan": True}), ("sgd", {"gan": {"center": "channel"}}),
                ("novograd", {"gan": True}), ("mvn", {"gan": True, "foreach": False}),
                ("novograd", {"fused": True})]
    records = {f"{name} {json.dumps(options)}": _fsdp_run(name, options)
               for name, options in configs}
    records['mvn {"fused": true}'] = _fsdp_run("mvn", {"fused": True}, make_deep_net)
    return records


def _fsdp_run(name, options, net=make_net):
    model = sharded_net(net)
    opt = make_optimizer(name, model.parameters(), **options)
    counts = []
    for x, y in batches():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(my_part(x)), my_part(y)).backward()
        counts.append(collectives(opt.step))
    reference = reference_net(name, net=net, **options)
    return {"error": distance(model.parameters(), reference.parameters()),
            "collectives_per_step": sorted(set(counts)), **_state_layout(model, opt)}


def _state_layout(model, opt):
    """Whether every state buffer is laid out as its parameter, and the bytes of the
    state each process holds against the whole."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    laid_out = True
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if key == "step" or value.ndim == 0:
                continue
            laid_out &= isinstance(value, DTensor) and value.placements == p.placements
            local += value.to_local().numel() * value.element_size()
            total += value.numel() * value.element_size()
    every = [None] * world()
    dist.all_gather_object(every, local)
    return {"state_laid_out_as_params": bool(laid_out), "state_bytes_per_process": every,
            "state_bytes": total}


def pure_functions():
    """The pure rules on DTensor arrays against the same rules on the whole tensors."""
    records = {}
    for name, rule in mvn_core.rules.items():
        variants = [{"center": "tensor"}, {"center": "channel"}] if name == "gan" else [HYPER]
        for hyper in variants:
            key = name if name != "gan" else f"gan {hyper['center']}"
            records[key] = _pure_run(rule, hyper, _arrays(3))
            if rule.kind == "transform" or not rule.per_coordinate:
                many = _pure_run(rule, hyper, _arrays(9))
                records[key]["collectives_per_step_9_tensors"] = many["collectives_per_step"]
    return records


def _arrays(n_matrices):
    """Plain tensors and their DTensors: matrices sharded over rows (one of them over
    columns), a vector, a 3-d tensor and a replicated 0-d tensor."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world(),))
    generator = torch.Generator().manual_seed(3)
    shapes = [(7 + i, 5) for i in range(n_matrices)] + [(9,), (4, 3, 2), ()]
    placements = [Shard(0)] * (n_matrices - 1) + [Shard(1), Shard(0), Shard(0), Replicate()]

    def draw():
        plain = [torch.randn(s, generator=generator, dtype=torch.float64) + 2.0 for s in shapes]
        return plain, [distribute_tensor(t, mesh, [pl]) for t, pl in zip(plain, placements)]
    return draw


def _pure_run(rule, hyper, draw):
    plain_params, params = draw()
    plain_state, state = rule.init(plain_params), rule.init(params)
    error, counts = 0.0, []
    for _ in range(STEPS):
        plain_grads, grads = draw()
        if rule.kind == "transform":
            expected, plain_state = rule.update(plain_state, plain_grads, **hyper)
            result = {}
            counts.append(collectives(lambda: result.update(out=rule.update(state, grads, **hyper))))
            got, state = result["out"]
        else:
            updates, plain_state = rule.update(plain_state, plain_grads, plain_params, **hyper)
            plain_params = mvn_core.apply_updates(plain_params, updates)
            result = {}
            counts.append(collectives(
                lambda: result.update(out=rule.update(state, grads, params, **hyper))))
            updates, state = result["out"]
            params = mvn_core.apply_updates(params, updates)
            got, expected = params, plain_params
        error = max(error, distance(got, expected))
        if rule.kind != "transform":  # every state buffer, NovoGrad's norms too
            for a, b in zip(state[1:], plain_state[1:]):
                error = max(error, distance(a, b))
    return {"error": error, "collectives_per_step": sorted(set(counts))}


def ddp_runs():
    """DDP, and DDP with ZeroRedundancyOptimizer, against one process."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    records = {}
    for name in CLASSES:
        reference = list(reference_net(name).parameters())
        model = DistributedDataParallel(make_net())
        train(model, make_optimizer(name, model.parameters()), batches(), my_part)
        records[f"ddp {name}"] = {"error": distance(model.parameters(), reference)}
        model = DistributedDataParallel(make_net())
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=CLASSES[name],
                                      **HYPER, **EXTRA.get(name, {}))
        train(model, opt, batches(), my_part)
        held = [None] * world()
        dist.all_gather_object(held, len(opt.optim.state))
        records[f"zero {name}"] = {"error": distance(model.parameters(), reference),
                                   "params_with_state_per_process": held,
                                   "params": len(list(model.parameters()))}
    records["zero state_dict and add_param_group"] = _zero_round_trip()
    return records


def _zero_round_trip():
    """ZeRO built on the first layer, the others added by ``add_param_group``; after two
    steps its consolidated state dict loads into a fresh ZeRO and into a plain
    optimizer of one process, and all continue alike."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    def zero(model):
        params = list(model.parameters())
        opt = ZeroRedundancyOptimizer(params[:2], optimizer_class=adapters.MVNGrad, **HYPER)
        opt.add_param_group({"params": params[2:]})
        return opt

    first, later = batches(2, seed=5), batches(2, seed=6)
    model = DistributedDataParallel(make_net())
    opt = zero(model)
    train(model, opt, first, my_part)
    opt.consolidate_state_dict(to=0)
    saved = [opt.state_dict() if rank() == 0 else None]
    dist.broadcast_object_list(saved, src=0)
    saved = saved[0]
    copy = DistributedDataParallel(make_net())
    copy.module.load_state_dict(model.module.state_dict())
    opt_copy = zero(copy)
    opt_copy.load_state_dict(deepcopy(saved))  # ZeRO empties others' entries of what it loads
    single = make_net()
    single.load_state_dict(model.module.state_dict())
    opt_single = adapters.MVNGrad([{"params": list(single.parameters())[:2]},
                                   {"params": list(single.parameters())[2:]}], **HYPER)
    opt_single.load_state_dict(deepcopy(saved))
    train(model, opt, later, my_part)
    train(copy, opt_copy, later, my_part)
    train(single, opt_single, later)
    reference = make_net()
    train(reference, adapters.MVNGrad(reference.parameters(), **HYPER), first + later)
    return {"error": distance(model.parameters(), reference.parameters()),
            "resumed_equal": all(torch.equal(a, b) for a, b in
                                 zip(model.parameters(), copy.parameters())),
            "one_process_error": distance(single.parameters(), model.parameters()),
            "rules_in_saved_groups": sorted({g["rule"] for g in saved["param_groups"]})}


def checkpoints(out, one_process_checkpoint):
    """torch.distributed.checkpoint: the sharded state saved and resumed on two
    processes, bit for bit; a checkpoint of one process resumed on two; another
    rule's state refused."""
    records = {}
    for name in CLASSES:
        records[f"2->2 {name}"] = _save_and_resume(name, os.path.join(out, "two_processes", name))
    for name in RESUMED:
        records[f"1->2 {name}"] = _resume_from_one_process(
            name, os.path.join(one_process_checkpoint, name))
    records["another rule refused"] = _another_rule_refused()
    return records


def optimizer_options(name):
    return {"gan": True} if name == "mvn" else {}


def checkpoint_state(model, opt):
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def load_checkpoint(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = checkpoint_state(model, opt)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def state_snapshot(model, opt):
    """Every state tensor and the GAN count, whole (gathered), keyed by parameter name."""
    out = {}
    for pname, p in model.named_parameters():
        for key, value in opt.state[p].items():
            out[f"{pname}/{key}"] = full(value).clone()
    for i, group in enumerate(opt.param_groups):
        if "gan_state" in group:
            out[f"group{i}/gan_count"] = group["gan_state"][0].clone()  # (count, extra)
    return out


def save_then_continue(model, opt, path, part=lambda t: t):
    """Three steps (one parameter frozen at the first, so that counts differ), a
    checkpoint at ``path`` with the whole state and params beside it, three more steps;
    the whole state and params after each stage are written by the first process."""
    import torch.distributed.checkpoint as dcp

    train(model, opt, batches(3, seed=7), part, frozen=[list(model.parameters())[-1]])
    saved = state_snapshot(model, opt)
    dcp.save(checkpoint_state(model, opt), checkpoint_id=path)
    _write(path, "at_save.pt", {"state": saved, "params": _params(model)})
    train(model, opt, batches(3, seed=8), part)
    _write(path, "after.pt", {"params": _params(model)})
    return saved


def resume_and_continue(model, opt, path, part=lambda t: t):
    """Load the checkpoint at ``path`` into ``model`` and ``opt``, continue as
    :func:`save_then_continue` did; returns whether the loaded state is the saved one,
    bit for bit, the counts, and the parameters' distance from the original run's."""
    load_checkpoint(model, opt, path)
    loaded = state_snapshot(model, opt)
    saved = torch.load(os.path.join(path, "at_save.pt"))["state"]
    train(model, opt, batches(3, seed=8), part)
    expected = torch.load(os.path.join(path, "after.pt"))["params"]
    got = _params(model)
    return {"state_equal_after_load": sorted(loaded) == sorted(saved) and
            all(torch.equal(loaded[k], saved[k]) for k in saved),
            "counts": sorted({int(v) for k, v in loaded.items() if k.endswith("/step")}),
            "error": distance(got.values(), [expected[k] for k in got]),
            "continued_equal": all(torch.equal(got[k], expected[k]) for k in got)}


def _params(model):
    return {k: full(p.detach()).clone() for k, p in model.named_parameters()}


def _write(path, file, value):
    if not dist.is_initialized() or rank() == 0:
        torch.save(value, os.path.join(path, file))
    if dist.is_initialized():
        dist.barrier()


def one_process_save(root):
    """The single-process half of the 1 -> 2 check: a checkpoint per resumed rule."""
    for name in RESUMED:
        model = make_net()
        save_then_continue(model, make_optimizer(name, model.parameters(),
                                                 **optimizer_options(name)),
                           os.path.join(root, name))


def one_process_resume(root, name):
    """The single-process half of the 2 -> 1 check."""
    model = make_net()
    opt = make_optimizer(name, model.parameters(), **optimizer_options(name))
    return resume_and_continue(model, opt, os.path.join(root, name))


def _save_and_resume(name, path):
    model = sharded_net()
    save_then_continue(model, make_optimizer(name, model.parameters(), **optimizer_options(name)),
                       path, my_part)
    resumed = sharded_net()
    return resume_and_continue(
        resumed, make_optimizer(name, resumed.parameters(), **optimizer_options(name)), path,
        my_part)


def _resume_from_one_process(name, path):
    model = sharded_net()
    return resume_and_continue(
        model, make_optimizer(name, model.parameters(), **optimizer_options(name)), path, my_part)


def skip_runs():
    """``skip_nonfinite=True`` on an FSDP2-sharded net, with a NaN in one process's shard
    of one gradient: every process must skip the step (the flag is reduced over the
    processes), and the next finite step must move the params."""
    records = {}
    for name in ("mvn", "novograd"):
        model = sharded_net()
        opt = make_optimizer(name, model.parameters(), skip_nonfinite=True)
        data = batches(2)
        train(model, opt, data[:1], my_part)
        before = _params(model)
        x, y = data[1]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(my_part(x)), my_part(y)).backward()
        if rank() == 1:
            shard = next(p.grad.to_local() for p in model.parameters()
                         if p.grad.to_local().numel())
            shard.view(-1)[0] = float("nan")
        opt.step()
        after = _params(model)
        mine = {"skipped": [group["skipped_steps"] for group in opt.param_groups],
                "unchanged": all(torch.equal(before[k], after[k]) for k in before)}
        processes = [None] * world()
        dist.all_gather_object(processes, mine)
        train(model, opt, data[1:], my_part)
        moved = _params(model)
        records[name] = {"processes": processes,
                         "moved_after": any(not torch.equal(after[k], moved[k]) for k in after)}
    return records


def _another_rule_refused():
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    model = sharded_net()
    mvn = make_optimizer("mvn", model.parameters())
    train(model, mvn, batches(1))
    saved = checkpoint_state(model, mvn)["optim"]
    adam = make_optimizer("adam", model.parameters())
    try:
        set_optimizer_state_dict(model, adam, saved)
    except ValueError as error:
        return {"refused": str(error)}
    return {"refused": None}


def main(out, one_process_checkpoint):
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    report = {}
    checks = {"fsdp": fsdp_runs, "pure": pure_functions, "ddp": ddp_runs, "skip": skip_runs,
              "checkpoint": lambda: checkpoints(out, one_process_checkpoint)}
    for name, check in checks.items():
        try:
            report[name] = check()
        except Exception:  # recorded for the test to show; the other checks still run
            report[name] = {"failed": traceback.format_exc()}
    if rank() == 0:
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
