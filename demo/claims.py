"""The three numerical claims of the MVN-Grad paper (docs/algorithms.md, "MVN-Grad"), reproduced.

Every number comes from the rules' own update functions, driven with crafted states
and gradients; nothing here re-derives a rule.  The rules are elementwise, so one call
on a vector computes many independent coordinates at once: one coordinate per noise
draw (claim 1), per spike size (claim 2) or per noise level and draw (claim 3).
A rule's *direction* is ``-update / lr`` with ``lr = 1`` and no weight decay.

1. One-step conditional variance: from a fixed state (mean ``m = mu``, variance
   ``v = sigma^2``, many steps in so bias corrections are ~1), draw ``g = mu + sigma xi``
   and compare the variance of MVN-Grad's direction (normalize, then momentum) with
   AdaBelief's (momentum, then normalize by the same ``v_t``).
2. Spike response: after one gradient of size ``G`` amid unit noise, the largest
   ``|direction|`` over the following steps, as ``G`` grows.
3. Vanishing noise: for ``g = mu + sigma xi`` with ``sigma -> 0``, the size of the
   direction after many steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

import mvn_core

RULES = ("adam", "laprop", "adabelief", "mvn")
TITLES = {"adam": "Adam", "laprop": "LaProp", "adabelief": "AdaBelief", "mvn": "MVN-Grad"}
# Lines that overlap (Adam and LaProp in claim 3, AdaBelief and MVN-Grad) stay visible.
STYLES = {"adam": dict(color="tab:orange", marker="s", ls="--", ms=7),
          "laprop": dict(color="tab:green", marker="o", ls="-", ms=4),
          "adabelief": dict(color="tab:red", marker="s", ls="--", ms=7),
          "mvn": dict(color="tab:blue", marker="o", ls="-", ms=4)}


def _direction(rule, state, grads, **hyper):
    """The rule's direction for ``grads`` (one NumPy vector) and its new state."""
    updates, state = mvn_core.rules[rule].update(state, grads, lr=1.0, **hyper)
    return -updates, state


# --- claim 1: one-step conditional variance --------------------------------------------

B2S = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)
NOISES = ("gaussian", "laplace")


@dataclass(frozen=True)
class VarianceSetting:
    """The fixed state and the gradient distribution of claim 1."""

    mu: float = 2.0
    sigma: float = 1.0
    b1: float = 0.9
    count: int = 1000  # steps already taken: bias corrections are ~1
    samples: int = 200_000
    eps: float = 1e-16  # every eps of both rules, so that both see exactly the same v_t


def _noise(rng, kind, n):
    """Zero-mean, unit-variance noise."""
    if kind == "gaussian":
        return rng.standard_normal(n)
    if kind == "laplace":
        return rng.laplace(scale=np.sqrt(0.5), size=n)
    raise ValueError(f"unknown noise {kind!r}: expected one of {NOISES}")


def variance_ratio(b2, noise="gaussian", setting=VarianceSetting(), seed=0) -> float:
    """Var(MVN-Grad's direction) / Var(AdaBelief's direction) over one step's noise.

    Both start from ``m = mu`` and ``v = s = sigma^2`` (MVN-Grad's ``u = 0``: it only
    shifts the direction), so both compute the same ``v_t`` (docs/algorithms.md: MVN-Grad's
    ``v`` is AdaBelief's ``s``); they differ only in where the momentum sits.
    """
    s = setting
    rng = np.random.default_rng(seed)
    g = s.mu + s.sigma * _noise(rng, noise, s.samples)

    def full(value):
        return (np.full(s.samples, value, dtype=np.float64),)

    count = np.asarray(s.count, dtype=np.int32)
    mvn_state = mvn_core.MVNState(count, full(s.mu), full(s.sigma ** 2), full(0.0))
    belief_state = mvn_core.AdaBeliefState(count, full(s.mu), full(s.sigma ** 2))
    ours, _ = _direction("mvn", mvn_state, g, b1=s.b1, b2=b2, eps=s.eps, eps_s=s.eps)
    theirs, _ = _direction("adabelief", belief_state, g, b1=s.b1, b2=b2, eps=s.eps)
    return float(np.var(ours) / np.var(theirs))


def variance_table(b2s=B2S, noises=NOISES, setting=VarianceSetting()) -> dict:
    """``{noise: [ratio for each b2]}``."""
    return {noise: [variance_ratio(b2, noise, setting) for b2 in b2s] for noise in noises}


# --- claim 2: spike response -----------------------------------------------------------

SPIKES = tuple(10.0 ** k for k in range(0, 13))


def spike_response(rule, sizes=SPIKES, b1=0.9, b2=0.5, warmup=50, after=300, seed=0):
    """The largest ``|direction|`` from the spike on, for each spike size.

    Every coordinate sees the same standard-normal gradients except at step
    ``warmup + 1``, where coordinate ``k`` gets ``sizes[k]``.  ``after`` steps follow,
    enough for the spike to fade from even the slowest ``v``.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    background = np.random.default_rng(seed).standard_normal(warmup + 1 + after)
    state = mvn_core.rules[rule].init(np.zeros_like(sizes))
    largest = np.zeros_like(sizes)
    for step, value in enumerate(background):
        grads = sizes if step == warmup else np.full_like(sizes, value)
        direction, state = _direction(rule, state, grads, b1=b1, b2=b2)
        if step >= warmup:
            largest = np.maximum(largest, np.abs(direction))
    return largest


def spike_table(rules=RULES, sizes=SPIKES, b1=0.9, b2=0.5) -> dict:
    """``{rule: largest |direction| for each size}``."""
    return {rule: spike_response(rule, sizes, b1, b2) for rule in rules}


# --- claim 3: vanishing noise ----------------------------------------------------------

SIGMAS = tuple(10.0 ** -k for k in range(0, 7))


def low_noise_directions(rule, sigmas=SIGMAS, mu=1.0, b1=0.9, b2=0.99, steps=3000, draws=32,
                         seed=0):
    """The mean ``|direction|`` at the last step for ``g = mu + sigma xi``, per sigma.

    ``steps`` is long enough for the start-up transient of ``v`` (residuals of order
    ``b1^t mu``) to fade below ``sigma^2`` for the smallest sigma.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    rng = np.random.default_rng(seed)
    state = mvn_core.rules[rule].init(np.zeros((len(sigmas), draws)))
    for _ in range(steps):
        g = mu + sigmas[:, None] * rng.standard_normal((len(sigmas), draws))
        direction, state = _direction(rule, state, g, b1=b1, b2=b2)
    return np.mean(np.abs(direction), axis=1)


def low_noise_table(rules=RULES, sigmas=SIGMAS) -> dict:
    """``{rule: mean |direction| for each sigma}``."""
    return {rule: low_noise_directions(rule, sigmas) for rule in rules}


# --- report --------------------------------------------------------------------------

def run_claims(out_dir=".", echo=print, plot=True) -> dict:
    """Compute the three claims, print their tables, write one PNG each into ``out_dir``."""
    setting = VarianceSetting()
    variance = variance_table(setting=setting)
    spikes = {b2: spike_table(b2=b2) for b2 in (0.5, 0.999)}
    low_noise = low_noise_table()
    for line in (variance_lines(variance, setting) + [""] + spike_lines(spikes) + [""]
                 + low_noise_lines(low_noise)):
        echo(line)
    paths = {}
    if plot:
        os.makedirs(out_dir, exist_ok=True)
        paths = {"variance": os.path.join(out_dir, "mvn-core-claim1-variance.png"),
                 "spike": os.path.join(out_dir, "mvn-core-claim2-spike.png"),
                 "low_noise": os.path.join(out_dir, "mvn-core-claim3-low-noise.png")}
        plot_variance(variance, paths["variance"])
        plot_spikes(spikes, paths["spike"])
        plot_low_noise(low_noise, paths["low_noise"])
        echo("plots written to " + ", ".join(paths.values()))
    return {"variance": variance, "spike": spikes, "low_noise": low_noise, "plots": paths}


def variance_lines(table, setting=VarianceSetting(), b2s=B2S):
    lines = [f"Claim 1: Var(MVN-Grad direction) / Var(AdaBelief direction), one step from "
             f"m = {setting.mu}, v = {setting.sigma ** 2}, g = {setting.mu} + {setting.sigma} "
             f"xi, b1 = {setting.b1} ({setting.samples} draws)",
             f"{'b2':>7} " + " ".join(f"{noise:>9}" for noise in table)]
    for k, b2 in enumerate(b2s):
        lines.append(f"{b2:>7} " + " ".join(f"{ratios[k]:>9.3f}" for ratios in table.values()))
    return lines


def spike_lines(by_b2, sizes=SPIKES):
    lines = ["Claim 2: largest |direction| after one gradient spike of size G (unit noise, b1 = 0.9)"]
    for b2, table in by_b2.items():
        lines.append(f"b2 = {b2}" + (" (b1^2 > b2)" if 0.81 > b2 else " (b1^2 < b2)"))
        lines.append(f"{'G':>7} " + " ".join(f"{TITLES[r]:>10}" for r in table))
        for k, size in enumerate(sizes):
            lines.append(f"{size:>7.0e} " + " ".join(f"{v[k]:>10.3g}" for v in table.values()))
    return lines


def low_noise_lines(table, sigmas=SIGMAS):
    lines = ["Claim 3: mean |direction| after 3000 steps of g = 1 + sigma xi (b1 = 0.9, b2 = 0.99)",
             f"{'sigma':>7} " + " ".join(f"{TITLES[r]:>10}" for r in table)]
    for k, sigma in enumerate(sigmas):
        lines.append(f"{sigma:>7.0e} " + " ".join(f"{v[k]:>10.4g}" for v in table.values()))
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_variance(table, path, b2s=B2S):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for noise, ratios in table.items():
        ax.plot(range(len(b2s)), ratios, marker="o", label=f"{noise} noise")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(b2s)), [str(b2) for b2 in b2s])
    ax.set(xlabel="b2", ylim=(0, 1.1),
           ylabel="Var(MVN-Grad) / Var(AdaBelief)",
           title="Claim 1: one-step variance of the direction, same v")
    ax.legend()
    _save(fig, path)


def plot_spikes(by_b2, path, sizes=SPIKES):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(by_b2), figsize=(12, 4.5), sharey=True)
    for ax, (b2, table) in zip(np.atleast_1d(axes), by_b2.items()):
        for rule, values in table.items():
            ax.plot(sizes, values, label=TITLES[rule], **STYLES[rule])
        ax.set(xscale="log", yscale="log", xlabel="spike size G",
               title=f"b1 = 0.9, b2 = {b2}" + (" (b1² > b2)" if 0.81 > b2 else ""))
    np.atleast_1d(axes)[0].set_ylabel("largest |direction| after the spike")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle("Claim 2: response to one gradient spike")
    _save(fig, path)


def plot_low_noise(table, path, sigmas=SIGMAS):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for rule, values in table.items():
        ax.plot(sigmas, values, label=TITLES[rule], **STYLES[rule])
    ax.set(xscale="log", yscale="log", xlabel="noise sigma (g = 1 + sigma xi)",
           ylabel="mean |direction| after 3000 steps",
           title="Claim 3: no sign collapse as the noise vanishes")
    ax.invert_xaxis()
    ax.legend()
    _save(fig, path)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
