"""The PyTorch optimizers: torch.optim's conventions, the pure rule's trajectories."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mvn_core  # noqa: E402
from mvn_core import backends  # noqa: E402
from mvn_core.adapters import torch as adapters  # noqa: E402
from mvn_core.conformance.problems import make_problem  # noqa: E402
from mvn_core.conformance.trajectories import core_trajectory, ieee_trajectory  # noqa: E402

CLASSES = dict(adapters.OPTIMIZERS)
# Each rule with the option of its last checked setting (the one that changes its
# equations most: AdaBelief's rectification, SGD's momentum, ...), weight decay apart.
HYPER = {name: {k: v for k, v in (mvn_core.rules[name].settings or ({},))[-1].items()
                if k != "weight_decay"} for name in CLASSES}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

STEPS = 30


def _torch_kwargs(name, core):
    """Core hyperparameters in the adapter's names (betas)."""
    kwargs = dict(core)
    beta_names = mvn_core.rules[name].betas
    if beta_names:
        defaults = mvn_core.rules[name].defaults
        kwargs["betas"] = tuple(kwargs.pop(b, defaults[b]) for b in beta_names)
    return kwargs


def _params(problem, dtype=torch.float64, device="cpu"):
    return [torch.tensor(p, dtype=dtype, device=device, requires_grad=True) for p in problem.params]


def _run(opt, params, grads_per_step, dtype=torch.float64):
    out = []
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=dtype, device=p.device)
        opt.step()
        out.append([p.detach().cpu().double().numpy().copy() for p in params])
    return out


def expected_trajectory(path, name, problem, dtype, **core):
    """What a path computes bit for bit: the generated kernel (the default), the pure
    rule in IEEE arithmetic (torch's own CPU square root is not correctly rounded);
    the multi-tensor and reference paths, the pure rule run on torch itself."""
    if path == "kernel":
        return ieee_trajectory(name, "torch", problem, dtype=dtype, **core)
    return core_trajectory(name, "torch", problem, dtype=dtype, **core)


PATH_OPTIONS = {"kernel": {}, "multi_tensor": {"foreach": True}, "reference": {"foreach": False}}


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("path", list(PATH_OPTIONS))
def test_trajectory_is_the_pure_rules(name, dtype, path):
    problem = make_problem(STEPS, seed=1)
    core = dict(HYPER[name], lr=1e-2, weight_decay=0.1)
    params = _params(problem, getattr(torch, dtype))
    opt = CLASSES[name](params, **_torch_kwargs(name, core), **PATH_OPTIONS[path])
    got = _run(opt, params, problem.grads, getattr(torch, dtype))
    expected = expected_trajectory(path, name, problem, dtype, **core)
    for step_got, step_expected in zip(got, expected):
        for a, b in zip(step_got, step_expected):
            np.testing.assert_array_equal(a, b)  # the same arithmetic: bit for bit


def _torch_pair(make_ours, make_theirs, steps=STEPS, dtype=torch.float64):
    problem = make_problem(steps, seed=2)
    ours, theirs = _params(problem, dtype), _params(problem, dtype)
    return (_run(make_ours(ours), ours, problem.grads, dtype),
            _run(make_theirs(theirs), theirs, problem.grads, dtype))


PEERS = {
    "AdamW": (lambda p: adapters.Adam(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1),
              lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)),
    "Adam-L2": (lambda p: adapters.Adam(p, lr=1e-2, weight_decay=0.1, coupled_weight_decay=True),
                lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1)),
    "SGD-nesterov": (lambda p: adapters.SGD(p, lr=1e-2, momentum=0.9, nesterov=True,
                                            weight_decay=0.1, coupled_weight_decay=True),
                     lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True,
                                               weight_decay=0.1)),
    "MaxVA-one-beta": (lambda p: adapters.MaxVA(p, lr=1e-2, betas=(0.9, 0.99), b2_min=0.99,
                                                weight_decay=0.1),
                       lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.99),
                                                   weight_decay=0.1)),
}


@pytest.mark.parametrize("peer", list(PEERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_equals_torch_optim(peer, dtype):
    ours, theirs = _torch_pair(*PEERS[peer], dtype=dtype)
    # Bias corrections differ in rounding only (ours: expm1 in the dtype; torch: Python
    # double); 30 steps of float32 rounding stay below 1e-5 of the parameter scale.
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for a_step, b_step in zip(ours, theirs):
        for a, b in zip(a_step, b_step):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.max(np.abs(b), initial=1))


def _pure_steps(name, params, grads_per_step, lrs, **core):
    """The pure rule with the learning rate of each step given."""
    rule = mvn_core.rules[name]
    params = [torch.tensor(p, dtype=torch.float64) for p in params]
    state = rule.init(params)
    for grads, lr in zip(grads_per_step, lrs):
        grads = [torch.tensor(g, dtype=torch.float64) for g in grads]
        updates, state = rule.update(state, grads, params, lr=lr, **core)
        params = mvn_core.apply_updates(params, updates)
    return [p.numpy() for p in params]


def test_param_groups_and_a_scheduler():
    problem = make_problem(20, seed=3)
    params = _params(problem)
    opt = adapters.MVNGrad([{"params": params[:3], "lr": 0.05},
                            {"params": params[3:4], "weight_decay": 0.1}], lr=0.01)
    opt.add_param_group({"params": params[4:], "betas": (0.8, 0.99)})
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    for grads in problem.grads:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        scheduler.step()
    factor = [0.5 ** (t // 5) for t in range(20)]
    grads = problem.grads
    expected = (
        _pure_steps("mvn", problem.params[:3], [g[:3] for g in grads], [0.05 * f for f in factor])
        + _pure_steps("mvn", problem.params[3:4], [g[3:4] for g in grads],
                      [0.01 * f for f in factor], weight_decay=0.1)
        + _pure_steps("mvn", problem.params[4:], [g[4:] for g in grads],
                      [0.01 * f for f in factor], b1=0.8, b2=0.99))
    for p, e in zip(params, expected):
        np.testing.assert_array_equal(p.detach().numpy(), e)


def test_one_cycle_scheduler_drives_lr_and_b1():
    params = [torch.zeros(3, requires_grad=True)]
    opt = adapters.Adam(params, lr=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    seen = []
    for _ in range(5):
        params[0].grad = torch.ones(3)
        opt.step()
        scheduler.step()
        seen.append(opt.param_groups[0]["betas"][0])
    assert len(set(seen)) == 5 and all(0.85 <= b <= 0.95 for b in seen)


def test_closure_maximize_zero_grad_and_missing_grads():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    frozen = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = adapters.LaProp([*model.parameters(), frozen], lr=0.1, maximize=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    assert frozen.grad is None and not opt.state[frozen]  # skipped: no grad, no state
    torch.testing.assert_close(frozen.detach(), torch.ones(2, dtype=torch.float64))
    grads = [p.grad.clone() for p in model.parameters()]
    state = mvn_core.laprop_init(before)
    updates, _ = mvn_core.laprop_update(state, [-g for g in grads], before, lr=0.1)
    for p, b, u in zip(model.parameters(), before, updates):
        torch.testing.assert_close(p.detach(), b + u, rtol=0, atol=0)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_zero_size_and_0d_parameters():
    params = [torch.zeros(0, 3, requires_grad=True), torch.tensor(1.5, requires_grad=True)]
    opt = adapters.NovoGrad(params, lr=0.1)
    params[0].grad, params[1].grad = torch.zeros(0, 3), torch.tensor(2.0)
    opt.step()
    assert params[0].shape == (0, 3)
    torch.testing.assert_close(params[1].detach(), torch.tensor(1.5 - 0.1 * 2.0 / (2.0 + 1e-8)))


def test_sparse_gradients_are_refused_and_change_nothing():
    dense, sparse = torch.ones(3, requires_grad=True), torch.ones(4, requires_grad=True)
    opt = adapters.Adam([dense, sparse], lr=0.1)
    dense.grad = torch.ones(3)
    sparse.grad = torch.ones(4).to_sparse()
    with pytest.raises(TypeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(dense.detach(), torch.ones(3)) and not opt.state[dense]


def test_bad_hyperparameters():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="b1=1.0 is out of range"):
        adapters.MVNGrad(p, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="betas must be a pair"):
        adapters.Adam(p, betas=(0.9,))
    with pytest.raises(TypeError, match="unexpected arguments \\['momentum'\\]"):
        adapters.Adam(p, momentum=0.9)
    with pytest.raises(ValueError, match="center="):
        adapters.SGD(p, gan={"center": "rows"})
    opt = adapters.Adam(p, lr=0.1)
    p[0].grad = torch.ones(2)
    opt.step()
    state = {k: v.clone() for k, v in opt.state[p[0]].items()}
    opt.param_groups[0]["lr"] = -1.0  # a bad value set later fails at the next step
    with pytest.raises(ValueError, match="lr=-1.0 is out of range"):
        opt.step()
    for k, v in state.items():
        assert torch.equal(opt.state[p[0]][k], v)


@pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}, {}, {"fused": True}],
                         ids=["reference", "multi_tensor", "kernel", "fused"])
def test_tensor_learning_rate(path):
    """A 0-d tensor rate acts as the same Python number, on every path."""
    shapes = [(3,)] * 17
    a = [torch.ones(s, requires_grad=True) for s in shapes]
    b = [torch.ones(s, requires_grad=True) for s in shapes]
    opt_a = adapters.AdaBelief(a, lr=torch.tensor(0.1), **path)
    opt_b = adapters.AdaBelief(b, lr=0.1, **path)
    for _ in range(3):
        for x, y in zip(a, b):
            x.grad, y.grad = torch.full((3,), 0.3), torch.full((3,), 0.3)
        opt_a.step()
        opt_b.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_gan_in_front_of_any_rule():
    problem = make_problem(10, seed=4)
    params = _params(problem)
    opt = adapters.SGD(params, lr=0.01, momentum=0.9, gan={"center": "channel"})
    got = _run(opt, params, problem.grads)[-1]
    ref = [torch.tensor(p) for p in problem.params]
    gan_state, sgd_state = mvn_core.gan_init(ref), mvn_core.sgd_init(ref)
    for grads in problem.grads:
        g_hat, gan_state = mvn_core.gan_update(gan_state, [torch.tensor(g) for g in grads],
                                               center="channel")
        updates, sgd_state = mvn_core.sgd_update(sgd_state, g_hat, ref, lr=0.01, momentum=0.9)
        ref = mvn_core.apply_updates(ref, updates)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b.numpy())
    count, extra = opt.param_groups[0]["gan_state"]  # plain tensors: weights_only loads them
    assert int(count) == 10 and extra == ()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_params_with_float32_state(dtype):
    problem = make_problem(10, seed=5)
    params = _params(problem, dtype)
    opt = adapters.MVNGrad(params, lr=1e-2, state_dtype=torch.float32)
    got = _run(opt, params, problem.grads, dtype)
    for p in params:
        assert p.dtype == dtype
        assert all(opt.state[p][k].dtype == torch.float32 for k in "mvu")
    # the pure rule, with the same float32 state, bit for bit
    ref = [torch.tensor(p, dtype=dtype) for p in problem.params]
    state = mvn_core.mvn_init(ref, state_dtype=torch.float32)
    for grads in problem.grads:
        updates, state = mvn_core.mvn_update(
            state, [torch.tensor(g, dtype=dtype) for g in grads], ref, lr=1e-2)
        ref = mvn_core.apply_updates(ref, updates)
    for a, b in zip(got[-1], ref):
        np.testing.assert_array_equal(a, b.double().numpy())


def _trained(name, steps, seed=6, state_dtype=None, dtype=torch.float64, device="cpu"):
    problem = make_problem(steps, seed=seed)
    params = _params(problem, dtype, device)
    kwargs = _torch_kwargs(name, dict(HYPER[name], lr=1e-2, weight_decay=0.1))
    opt = CLASSES[name](params, state_dtype=state_dtype, **kwargs)
    _run(opt, params, problem.grads, dtype)
    return params, opt


def _assert_continue_alike(opt, params, other, copies, grads_per_step):
    """Both optimizers take the same steps; their parameters stay bit-identical."""
    _run(opt, params, grads_per_step)
    _run(other, copies, grads_per_step)
    for a, b in zip(params, copies):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(CLASSES))
def test_state_dict_round_trip_continues_bit_identically(name):
    params, opt = _trained(name, 10)
    saved = pickle.loads(pickle.dumps(opt.state_dict()))
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = CLASSES[name](copies, **_torch_kwargs(name, dict(HYPER[name], lr=1e-2, weight_decay=0.1)))
    fresh.load_state_dict(saved)
    more = make_problem(10, seed=7).grads
    _assert_continue_alike(opt, params, fresh, copies, more)


def test_state_dict_keeps_float32_state_of_bfloat16_params():
    params, opt = _trained("adam", 5, state_dtype=torch.float32, dtype=torch.bfloat16)
    saved = opt.state_dict()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = adapters.Adam(copies, lr=1e-2, weight_decay=0.1, state_dtype=torch.float32)
    fresh.load_state_dict(saved)
    for p, c in zip(params, copies):
        for key in ("m", "v"):
            assert fresh.state[c][key].dtype == torch.float32
            assert torch.equal(fresh.state[c][key], opt.state[p][key])
    loaded = fresh.state[copies[5]]["m"].clone()
    saved["state"][5]["m"].add_(1.0)  # the optimizer holds copies, not the dict's tensors
    assert torch.equal(fresh.state[copies[5]]["m"], loaded)


def test_state_dict_into_a_fresh_process(tmp_path):
    params, opt = _trained("mvn", 8)
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()},
               tmp_path / "ckpt.pt")
    more = make_problem(5, seed=8)
    _run(opt, params, more.grads)
    np.save(tmp_path / "expected.npy", np.concatenate([p.detach().numpy().ravel() for p in params]))
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from mvn_core.adapters.torch import MVNGrad
        from mvn_core.conformance.problems import make_problem
        ckpt = torch.load({str(tmp_path / "ckpt.pt")!r})
        params = [torch.nn.Parameter(p) for p in ckpt["params"]]
        opt = MVNGrad(params, lr=1e-2, weight_decay=0.1)
        opt.load_state_dict(ckpt["opt"])
        for grads in make_problem(5, seed=8).grads:
            for p, g in zip(params, grads):
                p.grad = torch.tensor(g, dtype=torch.float64)
            opt.step()
        got = np.concatenate([p.detach().numpy().ravel() for p in params])
        assert np.array_equal(got, np.load({str(tmp_path / "expected.npy")!r})), "diverged"
        print("identical")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "identical"


def test_state_dict_loaded_in_place_keeps_each_parameters_count():
    """torch.distributed.checkpoint loads into the tensors of a fresh optimizer's state
    dict, then hands it to load_state_dict: parameters stepped together there must not
    share a count tensor in the dict, or all would get the count written last."""
    params, opt = _trained("adam", 3)
    params[4].grad = None
    for p in params[:4] + params[5:]:
        p.grad = torch.ones_like(p)
    opt.step()  # params[4] has count 3, the others 4
    saved = opt.state_dict()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = adapters.Adam(copies, lr=1e-2, weight_decay=0.1)
    for p in copies:
        p.grad = torch.zeros_like(p)
    fresh.step()  # one count tensor shared by all
    template = fresh.state_dict()
    for key, state in template["state"].items():
        for name, value in state.items():
            value.copy_(saved["state"][key][name])  # in place, as the checkpoint loader does
    fresh.load_state_dict(template)
    assert [int(fresh.state[p]["step"]) for p in copies] == [4, 4, 4, 4, 3, 4]
    assert int(opt.state[params[0]]["step"]) == 4  # the live state was not touched
    fresh.step()  # equal counts share one tensor again: two batches, not six
    assert len({id(fresh.state[p]["step"]) for p in copies}) == 2
    assert [int(fresh.state[p]["step"]) for p in copies] == [5, 5, 5, 5, 4, 5]


def _write_state_as_zero_does(opt, saved, device="cpu"):
    """What ``ZeroRedundancyOptimizer.load_state_dict`` does to its local optimizer: each
    parameter's state copied into ``optimizer.state`` directly (not through
    ``load_state_dict``), with its 0-d tensors on the CPU."""
    for p, (_, state) in zip(opt.param_groups[0]["params"], sorted(saved["state"].items())):
        opt.state[p] = {k: v.to("cpu" if v.ndim == 0 else device, copy=True)
                        for k, v in state.items()}


@pytest.mark.parametrize("path", [{}, {"foreach": False}])
@pytest.mark.parametrize("name", ["mvn", "novograd"])
def test_state_written_into_optimizer_state_is_checked_and_continues(name, path):
    params, opt = _trained(name, 6)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = CLASSES[name](copies, **_torch_kwargs(name, dict(HYPER[name], lr=1e-2,
                                                             weight_decay=0.1)), **path)
    _run(fresh, copies, make_problem(2, seed=3).grads)  # checked once, then overwritten
    _write_state_as_zero_does(fresh, opt.state_dict())
    with torch.no_grad():
        for c, p in zip(copies, params):
            c.copy_(p)
    more = make_problem(4, seed=7).grads
    _assert_continue_alike(opt, params, fresh, copies, more)
    counts = {id(fresh.state[p]["step"]) for p in copies}
    assert len(counts) == 1  # equal counts are shared again: the parameters step together

    bad = opt.state_dict()
    bad["state"][4]["m"] = bad["state"][4]["m"][:1]  # a loader that wrote a wrong shape
    _write_state_as_zero_does(fresh, bad)
    before = [p.detach().clone() for p in copies]
    with pytest.raises(ValueError, match=r"state\.m\[\d\] has shape"):
        _run(fresh, copies, more[:1])
    assert all(torch.equal(a, b) for a, b in zip(before, copies))


def test_loading_another_rules_state_fails_and_changes_nothing():
    params, opt = _trained("adam", 3)
    before = {k: v.clone() for k, v in opt.state[params[3]].items()}
    _, laprop = _trained("laprop", 3)
    with pytest.raises(ValueError, match="saved by laprop; Adam runs adam"):
        opt.load_state_dict(laprop.state_dict())
    torch_adam = torch.optim.Adam(params, lr=0.1)
    with pytest.raises(ValueError, match="not an mvn-core one"):
        opt.load_state_dict(torch_adam.state_dict())
    for k, v in before.items():
        assert torch.equal(opt.state[params[3]][k], v)


def test_loading_other_shapes_fails_and_changes_nothing():
    params, opt = _trained("mvn", 3)
    other = [torch.zeros(s, dtype=torch.float64, requires_grad=True)
             for s in [(), (0,), (0, 3), (7,), (4, 5), (2, 3, 2, 3)]]
    other_opt = adapters.MVNGrad(other, lr=1e-2)
    for p in other:
        p.grad = torch.ones_like(p)
    other_opt.step()
    before = {k: v.clone() for k, v in opt.state[params[4]].items()}
    with pytest.raises(ValueError, match=r"saved state 'm' of parameter 4 has shape \(4, 5\)"):
        opt.load_state_dict(other_opt.state_dict())
    with pytest.raises(ValueError, match="state dict has 2 param groups"):
        opt.load_state_dict({"state": {}, "param_groups": [opt.state_dict()["param_groups"][0]] * 2})
    for k, v in before.items():
        assert torch.equal(opt.state[params[4]][k], v)


@pytest.mark.skipif(backends.get("torch").compile_unavailable_reason("cpu") is not None,
                    reason="torch.compile on a CPU needs a C++ compiler, and none is installed")
def test_torch_compile_of_a_training_step():
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                                    torch.nn.Linear(4, 2)).double()
        return model, adapters.MVNGrad(model.parameters(), lr=1e-2, weight_decay=0.1)

    def train_step(model, opt, x):
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        opt.step()
        return loss

    eager, compiled = make(), make()
    step = torch.compile(train_step)
    for x in torch.randn(6, 8, 5, dtype=torch.float64):
        train_step(*eager, x)
        step(*compiled, x)
    for a, b in zip(eager[0].parameters(), compiled[0].parameters()):
        # the optimizer step is the same; the compiled model's gradients differ in rounding
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@CUDA
@pytest.mark.parametrize("name", list(CLASSES))
def test_cuda_trajectory_and_state_dict_across_devices(name):
    problem = make_problem(10, seed=9)
    core = dict(HYPER[name], lr=1e-2, weight_decay=0.1)
    params = _params(problem, torch.float64, "cuda")
    opt = CLASSES[name](params, **_torch_kwargs(name, core))
    got = _run(opt, params, problem.grads)
    expected = core_trajectory(name, "torch", problem, dtype="float64", **core)
    for a, b in zip(got[-1], expected[-1]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # CUDA -> CPU and back: the continuation is the same
    cpu = [torch.nn.Parameter(p.detach().cpu()) for p in params]
    opt_cpu = CLASSES[name](cpu, **_torch_kwargs(name, core))
    opt_cpu.load_state_dict(opt.state_dict())
    assert all(t.device.type == "cpu" for s in opt_cpu.state.values() for t in s.values())
    back = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opt_back = CLASSES[name](back, **_torch_kwargs(name, core))
    opt_back.load_state_dict(opt_cpu.state_dict())
    more = make_problem(5, seed=10).grads
    _assert_continue_alike(opt, params, opt_back, back, more)


@CUDA
@pytest.mark.parametrize("name", ["mvn", "novograd"])
def test_cuda_state_with_counts_left_on_the_cpu_continues(name):
    """ZeroRedundancyOptimizer leaves loaded 0-d state (the count, NovoGrad's v) on the
    CPU: the step moves it to its parameter's device and goes on exactly."""
    problem = make_problem(6, seed=12)
    core = dict(HYPER[name], lr=1e-2, weight_decay=0.1)
    params = _params(problem, torch.float64, "cuda")
    opt = CLASSES[name](params, **_torch_kwargs(name, core))
    _run(opt, params, problem.grads)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = CLASSES[name](copies, **_torch_kwargs(name, core))
    _write_state_as_zero_does(fresh, opt.state_dict(), device="cuda")
    more = make_problem(4, seed=13).grads
    _assert_continue_alike(opt, params, fresh, copies, more)
    assert all(t.device.type == "cuda" for s in fresh.state.values() for t in s.values())


# ---- execution paths: reference (foreach=False), multi-tensor (default), fused

def _path_run(name, dtype, problem, **options):
    core = dict(HYPER[name], lr=1e-2, weight_decay=0.1)
    params = _params(problem, getattr(torch, dtype))
    opt = CLASSES[name](params, **_torch_kwargs(name, core), **options)
    return _run(opt, params, problem.grads, getattr(torch, dtype)), core


@pytest.mark.parametrize("name", list(CLASSES))
def test_reference_path_is_the_pure_rule(name):
    problem = make_problem(10, seed=11)
    got, core = _path_run(name, "float32", problem, foreach=False)
    expected = core_trajectory(name, "torch", problem, dtype="float32", **core)
    for a, b in zip(got[-1], expected[-1]):
        np.testing.assert_array_equal(a, b)


def test_a_schedule_does_not_build_new_kernels():
    """Hyperparameters are kernel arguments: a schedule moving lr and betas[0] reuses
    one compiled kernel for every step."""
    from mvn_core.adapters import _cpu_kernel

    shapes = [(64,), (8, 9), (100,), (3, 5, 7)] * 8
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    opt = adapters.Adam(params, lr=0.1, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10)
    kernels = []
    for _ in range(4):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        scheduler.step()  # moves lr and betas[0]
        kernels.append(_cpu_kernel._compiled.cache_info().currsize)
    assert kernels[1:] == kernels[:1] * 3


def test_foreach_and_fused_options():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="exclude each other"):
        adapters.MVNGrad(p, foreach=True, fused=True)
    with pytest.raises(TypeError, match="fused must be None, True or False"):
        adapters.MVNGrad(p, fused=1)
    opt = adapters.MVNGrad(p)
    assert [opt.path_of(g) for g in opt.param_groups] == ["kernel"]
    for options in ({"foreach": False}, {"fused": True}, {"foreach": True}, {"fused": False}):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], **options})
    assert [opt.path_of(g) for g in opt.param_groups] == [
        "kernel", "reference", "fused", "multi_tensor", "multi_tensor"]


def test_partial_steps_and_a_group_added_mid_training_follow_the_pure_rule():
    """Parameters without a gradient on some steps keep their own count; a group added
    later starts its own: each parameter follows the pure rule with its own count."""
    rng = np.random.default_rng(21)
    shapes = [(4, 3), (5,), (2, 2)]
    values = [rng.standard_normal(s) for s in shapes]
    params = [torch.tensor(v, requires_grad=True) for v in values]
    opt = adapters.MVNGrad(params[:2], lr=0.05, foreach=None)
    refs = [[torch.tensor(v)] for v in values]
    states = [mvn_core.mvn_init(r) for r in refs]
    for step in range(8):
        if step == 3:
            opt.add_param_group({"params": [params[2]], "lr": 0.02})
        for i, p in enumerate(params):
            active = (i != 1 or step % 3 != 0) and (i != 2 or step >= 3)
            p.grad = torch.tensor(rng.standard_normal(shapes[i])) if active else None
            if active:
                lr = 0.02 if i == 2 else 0.05
                updates, states[i] = mvn_core.mvn_update(states[i], [p.grad.clone()], refs[i], lr=lr)
                refs[i] = mvn_core.apply_updates(refs[i], updates)
        opt.step()
    for p, r, s in zip(params, refs, states):
        assert torch.equal(p.detach(), r[0])
        assert int(opt.state[p]["step"]) == int(s.count)


@pytest.mark.parametrize("path", ["kernel", "multi_tensor"])
def test_tensors_larger_than_a_chunk_are_split_and_agree(path):
    from mvn_core.adapters import _cpu_kernel, _torch_paths

    n = max(_torch_paths.CHUNK, _cpu_kernel.CHUNK) * 2 + 123
    problem = make_problem(3, seed=22, shapes=((n,), (7,)))
    got, core = _path_run("maxva", "float32", problem, **PATH_OPTIONS[path])
    expected = expected_trajectory(path, "maxva", problem, "float32", **core)
    for a, b in zip(got[-1], expected[-1]):
        np.testing.assert_array_equal(a, b)


def test_a_loaded_state_of_wrong_dtypes_is_refused():
    params, opt = _trained("adam", 2)
    saved = opt.state_dict()
    integer = {**saved, "state": {**saved["state"], 3: {**saved["state"][3],
                                                         "m": saved["state"][3]["m"].long()}}}
    with pytest.raises(TypeError, match="saved state 'm' of parameter 3 has dtype torch.int64"):
        opt.load_state_dict(integer)
    mixed = {**saved, "state": {**saved["state"], 3: {**saved["state"][3],
                                                       "v": saved["state"][3]["v"].float()}}}
    with pytest.raises(TypeError, match="parameter 3 mixes dtypes"):
        opt.load_state_dict(mixed)


def test_a_bad_group_fails_before_any_group_changes():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = adapters.MVNGrad([{"params": [a]}, {"params": [b], "state_dtype": torch.int32}])
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    with pytest.raises(TypeError, match="state_dtype=torch.int32 is not a real floating dtype"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(3)) and not opt.state[a]
    with pytest.raises(TypeError, match="gan must be False, True or a dict"):
        adapters.SGD([a], gan="yes")


def test_gan_state_loads_with_weights_only(tmp_path):
    params, _ = _trained("sgd", 1)
    opt = adapters.SGD(params, lr=0.01, momentum=0.9, gan=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    fresh = adapters.SGD([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.01,
                         momentum=0.9, gan=True)
    fresh.load_state_dict(loaded)
    assert int(fresh.param_groups[0]["gan_state"][0]) == 1


# --- every step all or nothing ----------------------------------------------------------

def _frozen(opt, params):
    """Copies of the params and of their state, to compare bit for bit."""
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in params])


def _assert_unchanged(opt, params, frozen):
    values, states = frozen
    for p, v, state in zip(params, values, states):
        assert torch.equal(p.detach(), v)
        assert opt.state[p].keys() == state.keys()
        assert all(torch.equal(opt.state[p][k], x) for k, x in state.items())


def _one_clean_step(name, values, grads, **options):
    params = [torch.nn.Parameter(v.clone()) for v in values]
    opt = CLASSES[name](params, lr=0.1, **options)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return params


def _broken(kind):
    """A parameter that cannot be stepped, and a way to mend it."""
    if kind == "expanded":  # its 10 elements are one memory location
        bad = torch.zeros(1).expand(10)
        return bad, torch.ones(10), lambda opt: setattr(bad, "grad", None)
    with torch.inference_mode():  # an inference tensor cannot be written outside it
        bad = torch.zeros(10)
    return bad, torch.ones(10), lambda opt: setattr(bad, "grad", None)


@pytest.mark.parametrize("path", [{}, {"foreach": False}], ids=["multi_tensor", "reference"])
@pytest.mark.parametrize("kind,match", [("expanded", "elements that share memory"),
                                        ("inference", "is an inference tensor")])
def test_a_parameter_that_cannot_be_written_is_refused_before_any_write(kind, match, path):
    """The step raises before the first write (a large tensor first in line is written
    by then on the old code), and a retry after mending it takes the step once."""
    big = torch.nn.Parameter(torch.zeros(200_000))
    trained = torch.nn.Parameter(torch.ones(3))
    bad, bad_grad, mend = _broken(kind)
    opt = adapters.Adam([big, trained, bad], lr=0.1, **path)
    trained.grad = torch.full((3,), 0.5)
    opt.step()
    frozen = _frozen(opt, [big, trained])
    big.grad, trained.grad, bad.grad = torch.ones(200_000), torch.full((3,), -1.0), bad_grad
    with pytest.raises(ValueError, match=match):
        opt.step()
    _assert_unchanged(opt, [big, trained], frozen)
    assert not opt.state[bad]
    mend(opt)
    opt.step()
    assert int(opt.state[big]["step"]) == 1 and int(opt.state[trained]["step"]) == 2
    assert torch.equal(big.detach(), _one_clean_step("adam", [torch.zeros(200_000)],
                                                     [torch.ones(200_000)], **path)[0].detach())


@pytest.mark.parametrize("path", [{}, {"foreach": False}], ids=["multi_tensor", "reference"])
def test_a_parameter_reshaped_after_its_state_was_made_is_refused(path):
    big = torch.nn.Parameter(torch.zeros(200_000))
    p = torch.nn.Parameter(torch.zeros(4))
    opt = adapters.Adam([big, p], lr=0.1, **path)
    big.grad, p.grad = torch.ones(200_000), torch.ones(4)
    opt.step()
    frozen = _frozen(opt, [big])
    p.data = torch.zeros(1)
    p.grad = torch.ones(1)
    with pytest.raises(ValueError, match=r"shape \(1,\).*state 'm' of shape \(4,\)|"
                                         r"state\.m\[1\] has shape \(4,\)"):
        opt.step()
    _assert_unchanged(opt, [big], frozen)
    p.data = torch.zeros(4)  # put back: a gradient that no longer matches is refused too
    with pytest.raises(ValueError, match=r"has a gradient of shape \(1,\)"):
        opt.step()
    _assert_unchanged(opt, [big], frozen)


@pytest.mark.parametrize("path", [{}, {"foreach": False}], ids=["multi_tensor", "reference"])
def test_a_first_step_under_inference_mode_leaves_state_later_steps_can_update(path):
    problem = make_problem(4, seed=3)
    params = _params(problem, torch.float32)
    opt = adapters.MVNGrad(params, lr=1e-2, **path)
    for step, grads in enumerate(problem.grads):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float32)
        if step == 0:
            with torch.inference_mode():
                opt.step()
        else:
            opt.step()
    assert not any(v.is_inference() for p in params for v in opt.state[p].values())
    reference = _params(problem, torch.float32)
    expected = _run(adapters.MVNGrad(reference, lr=1e-2, **path), reference, problem.grads,
                    torch.float32)
    for p, e in zip(params, expected[-1]):
        np.testing.assert_array_equal(p.detach().double().numpy(), e)


# --- errors that name the problem --------------------------------------------------------

def test_hyperparameters_of_the_wrong_kind_get_clear_errors():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr .*is out of range"):
        adapters.Adam(p, lr=10 ** 400)
    with pytest.raises(TypeError, match=r"betas must be a pair \('b1', 'b2'\), got 0.9"):
        adapters.Adam(p, betas=0.9)
    opt = adapters.Adam(p, lr=torch.tensor(0.1, device="meta"))
    p[0].grad = torch.ones(2)
    with pytest.raises(ValueError, match="lr is on device meta but a parameter is on cpu"):
        opt.step()
    assert not opt.state[p[0]]


@pytest.mark.parametrize("change", ["missing key", "plain dicts"])
def test_param_groups_without_their_keys_get_clear_errors(change):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = adapters.Adam([p], lr=0.1)
    p.grad = torch.ones(2)
    if change == "missing key":
        del opt.param_groups[0]["eps"]
    else:
        opt.param_groups = [{"params": [p], "lr": 0.1}]
    with pytest.raises(ValueError, match="a param group has no .*'eps'"):
        opt.step()
    assert not opt.state[p] and torch.equal(p.detach(), torch.zeros(2))


def _saved_adam():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = adapters.Adam([p], lr=0.1)
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    return opt, p


@pytest.mark.parametrize("corrupt,error,match", [
    (lambda sd: sd["state"][0].update(m=None), TypeError,
     "saved state 'm' of parameter 0 is a NoneType"),
    (lambda sd: sd["state"][0].update(m=[0.0, 0.0, 0.0]), TypeError,
     "'m' of parameter 0 is a list"),
    (lambda sd: sd["state"][0].update(m=torch.zeros(3, dtype=torch.float64, device="meta")),
     ValueError, "meta tensor"),
    (lambda sd: sd.pop("state"), ValueError, "the state dict has no 'state'"),
    (lambda sd: sd["param_groups"][0].update(lr=-1.0), ValueError, "lr=-1.0 is out of range"),
    (lambda sd: sd["param_groups"][0].update(betas=(1.5, 0.9)), ValueError,
     "b1=1.5 is out of range"),
    (lambda sd: sd["param_groups"][0].update(skipped_steps=-1), ValueError,
     "skipped_steps must be"),
], ids=["none", "list", "meta", "no state", "lr", "betas", "skipped"])
def test_a_corrupt_state_dict_is_refused_before_anything_changes(corrupt, error, match):
    opt, p = _saved_adam()
    saved = opt.state_dict()
    corrupt(saved)
    frozen = _frozen(opt, [p])
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(error, match=match):
        opt.load_state_dict(saved)
    _assert_unchanged(opt, [p], frozen)
    assert [dict(g) for g in opt.param_groups] == groups


# --- torch.optim's own conventions ------------------------------------------------------

def test_state_entries_that_are_not_a_parameters_are_kept():
    opt, p = _saved_adam()
    opt.state["test"] = 1  # state-dict pre-hooks add such entries
    saved = opt.state_dict()
    assert saved["state"]["test"] == 1
    fresh = adapters.Adam([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))], lr=0.1)
    fresh.load_state_dict(saved)
    assert fresh.state["test"] == 1


def test_a_step_saved_as_a_plain_number_loads():
    opt, p = _saved_adam()
    saved = opt.state_dict()
    saved["state"][0]["step"] = 1.0  # the format of older torch.optim state dicts
    copy = torch.nn.Parameter(p.detach().clone())
    fresh = adapters.Adam([copy], lr=0.1)
    fresh.load_state_dict(saved)
    assert fresh.state[copy]["step"].dtype == torch.int32
    _assert_continue_alike(opt, [p], fresh, [copy], [[np.full(3, 0.5)]] * 2)


@pytest.mark.parametrize("path", [{}, {"foreach": False}], ids=["multi_tensor", "reference"])
def test_a_one_element_tensor_learning_rate_acts_as_its_value(path):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt_a = adapters.Adam([a], lr=torch.tensor([0.1]), betas=(torch.tensor([0.9]), 0.999), **path)
    opt_b = adapters.Adam([b], lr=torch.tensor(0.1), betas=(torch.tensor(0.9), 0.999), **path)
    for _ in range(2):
        a.grad, b.grad = torch.full((3,), 0.3), torch.full((3,), 0.3)
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"lr must be .* got an array of shape \(2,\)"):
        adapters.Adam([a], lr=torch.tensor([0.1, 0.2]))


def test_a_loaded_group_without_an_option_gets_its_default():
    opt, p = _saved_adam()
    saved = opt.state_dict()
    for option in ("maximize", "foreach", "fused", "skip_nonfinite", "skipped_steps"):
        del saved["param_groups"][0][option]
    copy = torch.nn.Parameter(p.detach().clone())
    fresh = adapters.Adam([copy], lr=0.1, maximize=True)
    fresh.load_state_dict(saved)
    group = fresh.param_groups[0]
    assert group["maximize"] is True and group["foreach"] is None and group["fused"] is None
    assert group["skipped_steps"] == 0
    copy.grad = torch.ones(3, dtype=torch.float64)
    fresh.step()
    assert int(fresh.state[copy]["step"]) == 2


# --- autograd --------------------------------------------------------------------------

@pytest.mark.parametrize("path", [{}, {"foreach": True}, {"foreach": False}, {"fused": True}],
                         ids=["kernel", "multi_tensor", "reference", "fused"])
def test_steps_on_parameters_that_require_grad_build_no_graph(path):
    params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]
    opt = adapters.MVNGrad(params, lr=1e-2, weight_decay=0.1, coupled_weight_decay=True, **path)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        assert p.grad_fn is None and p.requires_grad
        assert all(not v.requires_grad and v.grad_fn is None for v in opt.state[p].values())
