"""``mvn-core bench``: the command's report at tiny sizes, its arithmetic on hand-made
timings, the bytes per parameter of each rule, the memory probes, and the reporting of
what cannot run.  No timing is asserted: the figures depend on the machine."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np
import pytest

from mvn_core import cli
from mvn_core.adapters import _cpu_kernel
from mvn_core.bench import for_arrays as bench_arrays, report as bench_report
from mvn_core.bench import run as bench, timing as bench_timing
from mvn_core.conformance import oracle
from mvn_core.bench.timing import OURS, BackendBench, BenchCase, Stepper

TINY = ["--n", "3000", "--k", "5", "--repeat", "3", "--warmup", "2", "--device", "cpu"]
ROW_KEYS = {"backend", "device", "kind", "rule", "implementation", "path", "n", "k",
            "bytes_per_param", "compiled", "ms_per_step", "first_step_ms", "repeats", "baseline",
            "ratio_to_baseline", "gb_per_s", "fraction_of_copy", "state_bytes_per_param",
            "peak_bytes", "temporary_bytes", "memory_growth_bytes", "growth_steps",
            "memory_source", "error"}
ON_LINUX = sys.platform.startswith("linux")
MB = 1 << 20


def test_bytes_per_param_counts_the_per_coordinate_buffers_of_each_rule():
    # 4 (3 + 2 B) bytes from the oracle's restatement of each rule's buffers, and one more
    # read of g for a per-tensor norm: MVN-Grad 36, Adam 28, MaxVA 44, SGD 20, NovoGrad 24
    expected = {name: 4 * (3 + 2 * len(entry.buffers) + bool(entry.tensor_buffers))
                for name, entry in oracle.ENTRIES.items() if entry.step}
    assert {name: bench.bytes_per_param(name) for name in expected} == expected
    assert (expected["mvn"], expected["adam"], expected["maxva"]) == (36, 28, 44)
    assert bench.bytes_per_param("mvn", itemsize=8) == 72
    assert set(bench.RULES) == set(expected)  # GAN, a gradient transform, is not timed


def test_bandwidth_and_ratios_on_hand_made_timings():
    assert bench.gb_per_s(36, 10_000_000, 12.0) == pytest.approx(30.0)
    assert bench.copy_gb_per_s(10_000_000, 2.0) == pytest.approx(40.0)  # 8 bytes per float

    def row(implementation, path, rule, ms):
        return bench.Row("torch", "cpu", "cpu", rule, implementation, path, 10_000_000, 100,
                         bench.bytes_per_param(rule), ms_per_step=ms,
                         baseline="torch.optim.AdamW fused")

    base, ours = row("torch.optim.AdamW", "fused", "adam", 8.0), row(OURS, "fused", "mvn", 12.0)
    failed = row(OURS, "reference", "mvn", None)
    failed.error = "RuntimeError: boom"
    bench.complete_rows([base, ours, failed], copy_gbps=60.0)
    assert ours.gb_per_s == pytest.approx(36 * 1e7 / 12e-3 / 1e9)
    assert ours.ratio_to_baseline == pytest.approx(1.5)
    assert ours.fraction_of_copy == pytest.approx(0.5)
    assert base.ratio_to_baseline == 1.0 and base.gb_per_s == pytest.approx(35.0)
    assert failed.gb_per_s is None and failed.ratio_to_baseline is None

    alone = row(OURS, "arrays", "mvn", 12.0)
    alone.baseline = None  # NumPy and CuPy: no peer, the copy bandwidth only
    bench.complete_rows([alone], copy_gbps=None)
    assert alone.ratio_to_baseline is None and alone.fraction_of_copy is None


def _fake_row(backend, kind, implementation, path, ms, ratio=None, fraction=None, rule=None,
              **extra):
    return {"backend": backend, "device": "dev0", "kind": kind,
            "rule": rule or ("mvn" if implementation == OURS else "adam"),
            "implementation": implementation, "path": path, "ms_per_step": ms,
            "ratio_to_baseline": ratio, "fraction_of_copy": fraction, **extra}


def test_targets_are_computed_from_the_figures():
    rows = [_fake_row("torch", "cpu", "torch.optim.AdamW", "fused", 8.0, 1.0),
            _fake_row("torch", "cpu", OURS, "kernel", 11.0, 11 / 8),
            _fake_row("torch", "cpu", OURS, "kernel", 12.0, 1.5, rule="maxva"),
            _fake_row("torch", "cpu", OURS, "multi_tensor", 45.0, 45 / 8),
            _fake_row("jax", "gpu", "optax.adam", "jit", 1.0, 1.0, 0.9),
            _fake_row("jax", "gpu", OURS, "jit", 1.3, 1.3, 0.65)]
    scaling = [_fake_row("torch", "cpu", OURS, "kernel", 2.0, 0.3, sweep="k", k=1000),
               _fake_row("torch", "cpu", OURS, "kernel", 9.0, 0.12, sweep="k", k=10000)]
    first = [{"backend": "torch", "device": "dev0", "cold_s": 1.5, "warm_s": 0.3}]
    found = {t["target"]: t for t in bench_report.targets(
        {"rows": rows, "scaling": scaling, "first_steps": first})}
    default = found["CPU, PyTorch: MVN-Grad's default step / AdamW(fused=True)"]
    assert default["value"] == pytest.approx(11 / 8) and not default["met"]
    assert found["CPU, PyTorch: MaxVA's default step / AdamW(fused=True)"]["met"]
    at_1000 = found["CPU, PyTorch: 2M params in 1,000 tensors: MVN-Grad / AdamW(fused=True)"]
    assert at_1000["value"] == pytest.approx(0.3) and at_1000["met"]
    assert not found["CPU, PyTorch: 2M params in 10,000 tensors: MVN-Grad / AdamW(fused=True)"][
        "met"]
    assert found["CPU, PyTorch: MVN-Grad's first step, empty kernel cache (s)"]["met"]
    assert not found["CPU, PyTorch: MVN-Grad's first step, warm kernel cache (s)"]["met"]
    share = found["GPU, JAX: mvn_grad's share of the copy bandwidth, jitted"]
    assert share["value"] == pytest.approx(0.65) and not share["met"]
    unmeasured = found["GPU, CuPy: MVN-Grad's share of the copy bandwidth (fused=True)"]
    assert unmeasured["value"] is None and unmeasured["met"] is None
    lines = [bench_report._target_line(t) for t in found.values()]
    assert any("not measured" in line for line in lines)


def test_counts_on_the_command_line():
    assert [bench.count(t) for t in ("10000000", "1e7", "10M", "2k", "1_000")] == [
        10_000_000, 10_000_000, 10_000_000, 2_000, 1_000]
    for bad in ("0", "1.5", "ten", "-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.count(bad)


def test_more_tensors_than_parameters_is_refused(capsys):
    assert cli.main(["bench", "--n", "10", "--k", "20"]) == 2
    assert "--k 20 tensors cannot hold --n 10 parameters" in capsys.readouterr().err


def test_our_torch_paths_are_the_adapters_paths():
    from mvn_core.adapters.torch import OPTIONS, RuleOptimizer
    from mvn_core.bench import for_torch as bench_torch

    for path, options in bench_torch.PATHS.items():
        assert RuleOptimizer.path_of({**OPTIONS, **options}) == path


def test_the_command_reports_every_backend_as_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = cli.main(["bench", *TINY, "--backends", "torch,jax,numpy,cupy", "--paths",
                       "multi_tensor,reference,jit,arrays,foreach,loop", "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["schema"] == bench.SCHEMA
    assert set(report) == {"schema", "config", "environment", "copy", "rows", "scaling",
                           "first_steps", "skipped", "targets"}
    assert report["config"]["n"] == 3000 and report["config"]["repeat"] == 3
    assert report["environment"]["cpus"] >= 1 and "torch" in report["environment"]["libraries"]
    assert {r["backend"] for r in report["rows"]} == {"torch", "jax", "numpy"}
    assert {r["device"] for r in report["rows"]} == {"cpu", "cpu0"}  # JAX's first CPU
    assert {"backend": "cupy", "kind": "cpu", "case": None,
            "reason": "cupy runs on the GPU only"} in report["skipped"]
    copies = {(c["backend"], c["device"]): c["gb_per_s"] for c in report["copy"]}
    if _cpu_kernel.unavailable_reason() is None:  # the faster of the library's and a C loop's
        for c in report["copy"]:
            assert c["c_loop_gb_per_s"] > 0 and c["library_gb_per_s"] > 0
            assert c["gb_per_s"] == max(c["library_gb_per_s"], c["c_loop_gb_per_s"])
    for r in report["rows"]:
        assert set(r) == ROW_KEYS and r["error"] is None, r
        assert (r["n"], r["k"]) == (3000, 5)
        assert r["ms_per_step"] > 0 and r["first_step_ms"] > 0
        assert r["bytes_per_param"] == bench.bytes_per_param(r["rule"])
        assert r["compiled"] == (r["path"] == "jit")  # torch.optim's fused is not compiled
        assert r["gb_per_s"] == pytest.approx(r["bytes_per_param"] * 3000 / r["ms_per_step"] / 1e6)
        assert r["fraction_of_copy"] == pytest.approx(
            r["gb_per_s"] / copies[(r["backend"], r["device"])])
        # ours and the peers alike keep B buffers of 4 bytes per coordinate (and a count)
        buffers = (r["bytes_per_param"] // 4 - 3) // 2
        assert 4 * buffers <= r["state_bytes_per_param"] < 4 * buffers + 0.2, r
        assert r["repeats"] == (3 if r["path"] != "reference" else 2)
        assert r["growth_steps"] == r["repeats"] + bench_timing.SETTLE
        assert isinstance(r["memory_growth_bytes"], int) == ON_LINUX
    for backend, baseline in (("torch", "torch.optim.AdamW fused"), ("jax", "optax.adam jit")):
        rows = [r for r in report["rows"] if r["backend"] == backend]
        base = next(r for r in rows if f"{r['implementation']} {r['path']}" == baseline)
        assert base["ratio_to_baseline"] == 1.0
        for r in rows:
            assert r["baseline"] == baseline
            assert r["ratio_to_baseline"] == pytest.approx(r["ms_per_step"] / base["ms_per_step"])
    assert all(r["ratio_to_baseline"] is None for r in report["rows"] if r["backend"] == "numpy")
    implementations = {(r["backend"], r["implementation"]) for r in report["rows"]}
    assert {("torch", "torch.optim.Adam"), ("torch", "torch.optim.SGD"), ("jax", "optax.adamw"),
            ("jax", "optax.novograd"), ("jax", "optax.sgd")} <= implementations
    ours = {(r["backend"], r["rule"], r["path"]) for r in report["rows"] if r["implementation"] == OURS}
    assert ours == {(b, rule, p) for rule in bench.RULES for b, p in (
        ("torch", "multi_tensor"), ("torch", "reference"), ("jax", "jit"), ("numpy", "arrays"))}
    text = capsys.readouterr().out
    assert "torch cpu: N = 3,000 parameters in K = 5 tensors of " in text
    assert "ms/step" in text and "state B/param" in text and "targets" in text


def test_json_to_standard_output_moves_the_table_to_standard_error(capsys):
    assert cli.main(["bench", *TINY, "--backends", "numpy", "--rules", "sgd", "--json", "-"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [(r["rule"], r["path"]) for r in report["rows"]] == [("sgd", "arrays")]
    assert "numpy cpu: N = 3,000 parameters in K = 5 tensors" in captured.err


def _numpy_case(rule, implementation, make, requires=(), baseline=False):
    return BenchCase("fake", rule, implementation, "arrays", make, requires=requires,
                baseline=baseline)


def _plain_steps(work):
    def step():
        for p, g in zip(work.params, work.grads):
            p -= 1e-3 * g
    return Stepper(step, lambda: 0)


def _raises(work):
    raise RuntimeError("this optimizer cannot be made here")


def test_unavailable_backends_and_peers_are_reported_not_raised(monkeypatch):
    cases = [_numpy_case("sgd", "plain", _plain_steps, baseline=True),
             _numpy_case("adam", "a peer", _plain_steps, requires=("no_such_module_here",)),
             _numpy_case("adam", OURS, _raises)]
    fake = BackendBench("fake", lambda wanted: "cpu", lambda kind: None,
                        lambda n, k, kind: bench_arrays.NUMPY.workload(n, k, kind),
                        lambda: cases)
    absent = fake._replace(name="absent", unavailable_reason=lambda kind: "absent finds no GPU")
    monkeypatch.setattr(bench, "backend_bench",
                        lambda name: {"fake": fake, "absent": absent}[name])
    lines = []
    report = bench.run_bench(bench.Config(backends=("absent", "fake"), n=100, k=2, warmup=1,
                                          repeat=2), progress=lines.append)
    assert {(s["backend"], s["case"], s["reason"]) for s in report["skipped"]} == {
        ("absent", None, "absent finds no GPU"),
        ("fake", "a peer arrays", "no_such_module_here not installed")}
    rows = {r["implementation"]: r for r in report["rows"]}
    assert set(rows) == {"plain", OURS}
    assert rows["plain"]["ms_per_step"] > 0 and rows["plain"]["error"] is None
    assert rows[OURS]["error"] == "RuntimeError: this optimizer cannot be made here"
    assert rows[OURS]["ms_per_step"] is None
    text = "\n".join(bench_report.report_lines(report))
    assert "absent cpu: absent finds no GPU" in text and "FAILED: RuntimeError" in text
    assert any("FAILED" in line for line in lines)


def test_library_backends_say_why_they_cannot_run():
    assert bench_arrays.CUPY.unavailable_reason("cpu") == "cupy runs on the GPU only"
    assert bench_arrays.NUMPY.unavailable_reason("gpu") == "numpy runs on the CPU only"
    torch = pytest.importorskip("torch")
    from mvn_core.bench import for_torch as bench_torch

    if not torch.cuda.is_available():
        assert bench_torch.BENCH.unavailable_reason("gpu") == "torch finds no CUDA device"
        assert bench_torch.BENCH.device_kind("auto") == "cpu"


def test_memory_probe_sees_a_leak_and_a_temporary():
    """Memory growth and peaks come from a real probe: a step that keeps 4 MB for good
    grows by that much per step of the growth window; one that uses 16 MB for a moment
    has that peak and no growth."""
    work = bench_arrays.NUMPY.workload(1000, 2, "cpu")
    kept = []

    def leaking(work):
        return Stepper(lambda: kept.append(np.ones(1 << 20, np.float32)), lambda: 0)

    def temporary(work):
        return Stepper(lambda: np.ones(1 << 22, np.float32).sum(), lambda: 0)

    leak = bench_timing.measure(BenchCase("numpy", "sgd", "leak", "arrays", leaking), work, 2, 5)
    peak = bench_timing.measure(BenchCase("numpy", "sgd", "peak", "arrays", temporary), work, 2, 5)
    if not ON_LINUX:  # no /proc: the probe has no readings, and says so
        assert leak.growth_bytes is None and peak.peak_bytes is None
        return
    assert leak.growth_steps == 5 + bench_timing.SETTLE
    assert 0.9 * 4 * MB * leak.growth_steps <= leak.growth_bytes <= 1.1 * 4 * MB * leak.growth_steps
    assert peak.temporary_bytes >= 15 * MB and abs(peak.growth_bytes) < MB


def test_scaling_times_mvn_and_the_baselines_as_n_and_k_grow(monkeypatch):
    monkeypatch.setattr(bench, "SCALING_KS", (2, 8))
    monkeypatch.setattr(bench, "SCALING_K_AT_N", 800)
    monkeypatch.setattr(bench, "SCALING_K_LIMITS", {"numpy": (2, "too many tensors here")})
    config = bench.Config(backends=("torch", "numpy"), paths=("multi_tensor", "foreach", "arrays"),
                          device="cpu", n=1000, k=4, warmup=2, repeat=3, scaling=True)
    report = bench.run_bench(config, progress=lambda line: None)
    sizes = {(r["backend"], r["sweep"], r["n"], r["k"]) for r in report["scaling"]}
    assert sizes == {(b, "n", n, 4) for b in ("torch", "numpy") for n in (100, 1000, 4000)} | {
        ("torch", "k", 800, 2), ("torch", "k", 800, 8), ("numpy", "k", 800, 2)}
    assert report["skipped"] == [{"backend": "numpy", "kind": "cpu", "case": "--scaling at K > 2",
                                  "reason": "too many tensors here"}]
    labels = {(r["backend"], r["implementation"], r["path"]) for r in report["scaling"]}
    assert labels == {("torch", OURS, "multi_tensor"), ("torch", "torch.optim.AdamW", "fused"),
                      ("torch", "torch.optim.AdamW", "foreach"), ("numpy", OURS, "arrays")}
    assert all(r["rule"] in ("mvn", "adam") and r["error"] is None for r in report["scaling"])
    text = "\n".join(bench_report.report_lines(report))
    assert "scaling, torch cpu: ms/step as N grows (K = 4)" in text
    assert "scaling, numpy cpu: ms/step as K grows (N = 800)" in text
    given = bench.run_bench(dataclasses.replace(config, backends=("numpy",), scaling_ks=(2, 8)),
                            progress=lambda line: None)
    assert {r["k"] for r in given["scaling"] if r["sweep"] == "k"} == {2, 8}


def test_gpu_rows(capsys):
    """On a GPU: every GPU backend installed here runs there (tiny sizes), with its
    device's memory counts."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert cli.main(["bench", "--n", "3000", "--k", "20", "--repeat", "3", "--warmup", "2",
                     "--device", "gpu", "--rules", "mvn,adam", "--backends", "torch,jax,cupy",
                     "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]
    assert rows and all(r["kind"] == "gpu" and r["error"] is None for r in rows)
    torch_rows = [r for r in rows if r["backend"] == "torch"]
    assert {r["path"] for r in torch_rows if r["implementation"] == OURS} == {
        "reference", "multi_tensor", "kernel"}
    assert all(r["memory_source"].startswith("torch.cuda") and r["peak_bytes"] > 0
               for r in torch_rows)
    assert [t for t in report["targets"] if t["target"].startswith("torch GPU")]


def test_the_distributed_benchmark_has_its_own_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench-distributed", "--help"])
    assert exit_.value.code == 0 and "FSDP2" in capsys.readouterr().out


def test_the_default_paths_first_step_is_timed_cold_and_warm():
    pytest.importorskip("torch")
    report = bench.run_bench(bench.Config(rules=("mvn",), backends=("torch",), paths=("kernel",),
                                          device="cpu", n=3000, k=5, warmup=2, repeat=3),
                             progress=lambda line: None)
    (first,) = report["first_steps"]
    assert first["cold_s"] > 0 and first["warm_s"] > 0 and (first["n"], first["k"]) == (3000, 5)
    measured = {t["target"] for t in report["targets"] if t["value"] is not None}
    assert "CPU, PyTorch: MVN-Grad's first step, empty kernel cache (s)" in measured
