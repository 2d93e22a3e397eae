"""The torch optimizers' replayed kernel step (adapters/_torch_replay.py), with the
tensors read by the C++ helper (adapters/_torch_gather.py) and in Python: every step is
the full kernel step's, bit for bit, and any change takes the full step."""

from __future__ import annotations

import array
import pickle
import warnings
from collections import defaultdict

import pytest

torch = pytest.importorskip("torch")

from mvn_core.adapters import _cpu_kernel, _torch_gather  # noqa: E402
from mvn_core.adapters import torch as adapters  # noqa: E402
from mvn_core.adapters._torch_replay import Replay  # noqa: E402

pytestmark = pytest.mark.skipif(_cpu_kernel.unavailable_reason() is not None,
                                reason="no C compiler: no kernel, nothing replayed")


def _helper_or_skip():
    """The helper, or a skip where it cannot be built (no C++ compiler, or no torch
    headers): the replay then reads in Python, tested on its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning is tested below
        helper = _torch_gather.helper(wait=True)
    if helper is None:
        pytest.skip(f"the C++ helper cannot be built here: {_torch_gather.unavailable_reason()}")
    return helper


def _without_helper(monkeypatch):
    monkeypatch.setattr(_torch_gather, "helper", lambda wait=False, many=False: None)
    monkeypatch.setattr(_torch_gather, "loaded", lambda: None)


@pytest.fixture(params=["C++ helper", "Python"])
def gathering(request, monkeypatch):
    """Each test twice: the replay reading the tensors with the C++ helper, and in Python."""
    if request.param == "Python":
        _without_helper(monkeypatch)
    else:
        _helper_or_skip()
    return request.param


def _replay_setup(n=6, seed=30, **options):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)) for _ in range(n)]
    opt = adapters.MVNGrad(params, lr=0.01, weight_decay=0.1, **options)
    return params, opt, gen


def _never_replayed(opt):
    """``opt`` taking the full kernel step every time: the replay's reference."""
    opt._replayed = lambda group: None
    return opt


def _twin(params, cls=adapters.MVNGrad, **options):
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return copies, _never_replayed(cls(copies, **options))


def _count_full_steps(monkeypatch, opt):
    calls = []
    original = opt._plan

    def counted(group):
        calls.append(1)
        return original(group)

    monkeypatch.setattr(opt, "_plan", counted)
    return calls


def _grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _copy_grads(source, target):
    for a, b in zip(source, target):
        b.grad = None if a.grad is None else a.grad.clone()


def _step_both(opt, twin, params, copies, gen, steps=1):
    """``steps`` steps of both optimizers, on the same fresh gradients."""
    for _ in range(steps):
        _grads(params, gen)
        _copy_grads(params, copies)
        opt.step()
        twin.step()


def _assert_same(params, copies):
    for p, c in zip(params, copies):
        assert torch.equal(p, c), "the replayed step differs from the full kernel step"


def test_steps_after_the_first_replay_the_prepared_kernel_step(monkeypatch, gathering):
    params, opt, gen = _replay_setup()
    copies, twin = _twin(params, lr=0.01, weight_decay=0.1)
    full = _count_full_steps(monkeypatch, opt)
    for step in range(5):
        _grads(params, gen)
        _copy_grads(params, copies)
        for o in (opt, twin):
            o.param_groups[0]["lr"] = 0.01 * 0.9 ** step  # read at every step, replayed or not
            o.step()
    assert len(full) == 1  # the first step prepares; the others replay
    _assert_same(params, copies)
    assert int(opt.state[params[0]]["step"]) == 5
    saved = opt.state_dict()  # the count, updated in place, is saved per parameter
    assert all(int(s["step"]) == 5 for s in saved["state"].values())


def test_the_helper_does_the_reading_where_it_is_built(monkeypatch):
    """With the helper loaded, a replayed step reads no tensor in Python."""
    _helper_or_skip()
    params, opt, gen = _replay_setup()
    copies, twin = _twin(params, lr=0.01, weight_decay=0.1)

    def read_in_python(*args):
        raise AssertionError("the replay read the tensors in Python")

    monkeypatch.setattr(Replay, "_checked_grads", read_in_python)
    full = _count_full_steps(monkeypatch, opt)
    _step_both(opt, twin, params, copies, gen, steps=3)
    assert len(full) == 1
    _assert_same(params, copies)


CHANGES = ["state written", "state loaded", "parameter moved", "a gradient missing",
           "a strided gradient", "a gradient of another dtype", "parameters swapped",
           "a new group"]


@pytest.mark.parametrize("change", CHANGES)
def test_a_replay_gives_way_to_the_full_step_when_something_changed(monkeypatch, change,
                                                                    gathering):
    """After each change the step is the full one, the same as an optimizer's that
    never replays."""
    params, opt, gen = _replay_setup()
    twin_params, twin = _twin(params, lr=0.01, weight_decay=0.1)
    _step_both(opt, twin, params, twin_params, gen, steps=2)  # prepared, then replayed
    full = _count_full_steps(monkeypatch, opt)
    for o, ps in ((opt, params), (twin, twin_params)):
        if change == "state written":
            o.state[ps[2]]["m"] = torch.ones(5, 3)
        elif change == "state loaded":
            o.load_state_dict(o.state_dict())
        elif change == "parameter moved":
            ps[1].data = ps[1].data.clone()
        elif change == "parameters swapped":
            torch.utils.swap_tensors(ps[0], ps[1])
        elif change == "a new group":
            extra = torch.nn.Parameter(torch.zeros(4))
            o.add_param_group({"params": [extra]})
            extra.grad = torch.ones(4)
    _grads(params, gen)
    if change == "a gradient missing":
        params[3].grad = None
    if change == "a strided gradient":
        params[4].grad = torch.randn(3, 5, generator=gen).t()
    if change == "a gradient of another dtype":
        params[5].grad_dtype = twin_params[5].grad_dtype = None
        params[5].grad = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    _copy_grads(params, twin_params)
    opt.step()
    assert len(full) == 1
    twin.step()
    _assert_same(params, twin_params)
    _step_both(opt, twin, params, twin_params, gen)  # and the step after it: prepared anew
    _assert_same(params, twin_params)


def test_a_sparse_gradient_is_named_by_the_full_step(gathering):
    params, opt, gen = _replay_setup()
    for _ in range(2):
        _grads(params, gen)
        opt.step()
    before = [p.detach().clone() for p in params]
    params[2].grad = torch.randn(5, 3, generator=gen).to_sparse()
    with pytest.raises(TypeError, match="does not support sparse gradients"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_a_refused_replayed_step_changes_nothing(gathering):
    params, opt, gen = _replay_setup()
    _grads(params, gen)
    opt.step()
    _grads(params, gen)
    opt.step()  # replayed
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr=-1.0 is out of range"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state.items())


def _many_params(gen):
    """Above the helper's threshold: sizes from empty to more than a chunk, three dtypes
    (three launches)."""
    sizes = [0, 1, 7, 200, 3000, _cpu_kernel.CHUNK + 5]
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    count = max(_torch_gather.MANY, 2 * len(sizes) * len(dtypes))
    return [torch.nn.Parameter(torch.randn(sizes[i % len(sizes)], generator=gen)
                               .to(dtypes[i % len(dtypes)])) for i in range(count)]


@pytest.mark.parametrize("name", sorted(adapters.OPTIMIZERS))
@pytest.mark.parametrize("options", [{}, {"maximize": True, "skip_nonfinite": True}],
                         ids=["defaults", "maximize, skip_nonfinite"])
def test_many_tensors_of_mixed_dtypes_replay_bit_for_bit(monkeypatch, name, options, gathering):
    """Every rule (NovoGrad's statistic included), with weight decay, over many tensors
    in three launches: the replayed steps are the full kernel step's."""
    cls = adapters.OPTIMIZERS[name]
    gen = torch.Generator().manual_seed(31)
    params = _many_params(gen)
    opt = cls(params, lr=0.01, weight_decay=0.01, **options)
    copies, twin = _twin(params, cls, lr=0.01, weight_decay=0.01, **options)
    full = _count_full_steps(monkeypatch, opt)
    for step in range(4):
        _grads(params, gen)
        if step == 2 and options:
            params[3].grad[0] = float("inf")  # a skipped step
        _copy_grads(params, copies)
        opt.step()
        twin.step()
    assert len(full) == 1
    _assert_same(params, copies)
    if options:
        assert opt.param_groups[0]["skipped_steps"] == 1


def test_the_helper_reads_what_python_reads():
    """Each gradient's address, or the first tensor that differs from what was prepared."""
    helper = _helper_or_skip()
    gen = torch.Generator().manual_seed(32)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (3, 0, 5, 4)]
    _grads(params, gen)
    n = len(params)
    impls = array.array("q", (p._cdata for p in params))
    numel = array.array("q", (p.numel() for p in params))
    types = array.array("b", bytes(n))

    def address(a):
        return a.buffer_info()[0]

    assert helper.grad_types(n, address(impls), address(types)) == n
    assert len(set(types)) == 1 and types[0] >= 0

    prepared = [p.data_ptr() for p in params]

    def gather():
        table = array.array("q", prepared)
        table.frombytes(bytes(8 * n))
        done = helper.gather_grads(n, address(impls), address(numel), address(types),
                                   address(table))
        return done, list(table[n:])

    assert gather() == (n, [p.grad.data_ptr() for p in params])
    differences = {
        "a gradient missing": lambda: setattr(params[2], "grad", None),
        "a strided gradient": lambda: setattr(params[2], "grad", torch.randn(10)[::2]),
        "a sparse gradient": lambda: setattr(params[2], "grad", torch.randn(5).to_sparse()),
        "another dtype": lambda: (setattr(params[2], "grad_dtype", None),
                                  setattr(params[2], "grad", torch.randn(5, dtype=torch.float64))),
        "parameter moved": lambda: setattr(params[2], "data", torch.randn(5)),
        "parameter resized": lambda: setattr(params[2], "data", torch.randn(6)),
        "parameter shrunk in place": lambda: setattr(params[2], "data", params[2].detach()[:4]),
        "gradient shrunk": lambda: setattr(params[2].grad, "data", torch.randn(4)),
    }
    for what, change in differences.items():
        saved = params[2].detach(), params[2].grad.detach()
        change()
        assert gather()[0] == 2, what
        params[2].data, params[2].grad = saved
    assert gather() == (n, [p.grad.data_ptr() for p in params])
    # shared copy-on-write with a lazy clone: a write must copy the data first, as
    # data_ptr() does, and the parameter is found elsewhere (never written through)
    clone = torch._lazy_clone(params[2])
    assert gather()[0] == 2 and params[2].data_ptr() != prepared[2]
    assert torch.equal(clone, params[2])


def test_a_swap_before_the_helper_first_reads_is_seen(monkeypatch):
    """Prepared while the helper was not loaded, the replay must not hand the helper the
    TensorImpls of parameters swapped since: as ``Module.to()`` swaps when told to, a
    new parameter on the same storage swapped in, the old TensorImpl then freed (its
    data still at the same address, so only the TensorImpl tells)."""
    _helper_or_skip()
    params, opt, gen = _replay_setup()
    twin_params, twin = _twin(params, lr=0.01, weight_decay=0.1)
    with monkeypatch.context() as patch:
        _without_helper(patch)
        _step_both(opt, twin, params, twin_params, gen)  # prepared without the helper
    for ps in (params, twin_params):
        new = torch.nn.Parameter(ps[0].data)
        torch.utils.swap_tensors(ps[0], new)
        del new  # the TensorImpl the replay was prepared with
    full = _count_full_steps(monkeypatch, opt)
    _step_both(opt, twin, params, twin_params, gen, steps=2)
    assert len(full) == 1  # the step after the swap: prepared anew
    _assert_same(params, twin_params)


def test_a_failed_build_is_said_before_a_step_writes(monkeypatch):
    """The warning comes from a replay's reading, before anything is written: under
    warnings as errors the step raises and changes nothing; the full step that prepared
    the replay said nothing after writing."""
    def fails():
        raise _cpu_kernel.KernelUnavailable("no working C++ compiler was found")

    monkeypatch.setattr(_torch_gather, "_build", fails)
    builder = _torch_gather._Builder()
    builder.start()
    builder.wait_if_started()
    for name in ("helper", "loaded", "start", "wait_if_started", "unavailable_reason"):
        monkeypatch.setattr(_torch_gather, name, getattr(builder, name))
    gen = torch.Generator().manual_seed(33)
    params = [torch.nn.Parameter(torch.randn(3, generator=gen))
              for _ in range(_torch_gather.MANY)]
    opt = adapters.MVNGrad(params, lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _grads(params, gen)
        opt.step()  # the full step, which prepares the replay
        before = [p.detach().clone() for p in params]
        _grads(params, gen)
        with pytest.raises(RuntimeWarning, match="instead of its C.. helper"):
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    opt.step()  # said once: the replay reads in Python
    assert not all(torch.equal(a, b) for a, b in zip(params, before))


def test_without_the_helper_one_warning_says_why(monkeypatch):
    def fails():
        raise _cpu_kernel.KernelUnavailable("no working C++ compiler was found")

    monkeypatch.setattr(_torch_gather, "_build", fails)
    builder = _torch_gather._Builder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert builder.helper(wait=True) is None  # a few tensors: nothing to say
    with pytest.warns(RuntimeWarning, match="instead of its C.. helper: no working C"):
        assert builder.helper(many=True) is None
    assert builder.helper(many=True) is None  # said once
    assert builder.unavailable_reason() == "no working C++ compiler was found"


def test_the_tracked_state_pickles_as_torchs_own():
    params, opt, gen = _replay_setup(n=2)
    _grads(params, gen)
    opt.step()
    opt.state["not a parameter"] = 1
    copy = pickle.loads(pickle.dumps(opt.state))
    assert type(copy) is defaultdict and all(type(v) is dict for k, v in copy.items()
                                             if isinstance(k, torch.Tensor))
    assert copy["not a parameter"] == 1
    version = opt.state.version
    opt.state[params[0]].pop("m")
    assert opt.state.version == version + 1


def test_gan_with_its_defaults_is_never_replayed(monkeypatch):
    """gan={} turns GAN on with its defaults: every step takes the full path."""
    params, opt, gen = _replay_setup(gan={})
    full = _count_full_steps(monkeypatch, opt)
    for _ in range(3):
        _grads(params, gen)
        opt.step()
    assert len(full) == 3
