"""Peers that more than one entry uses (each entry's own are in its module).  Every
library is imported when a peer is made, never when this module is."""

from __future__ import annotations

import contextlib
import io

from . import betas


def _timm(module):
    from mvn_core.conformance.peers import timm_optim

    return timm_optim(module)


def timm_laprop(params, h, **options):
    return _timm("laprop").LaProp(params, lr=h["lr"], betas=betas(h), eps=h["eps"], **options)


def timm_adabelief(params, h, eps="eps", **options):
    return _timm("adabelief").AdaBelief(
        params, lr=h["lr"], betas=betas(h), eps=h[eps], weight_decay=h.get("weight_decay", 0.0),
        decoupled_decay=True, rectify=False, **options)


def official_adabelief(params, h, eps="eps"):
    from adabelief_pytorch import AdaBelief

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its settings, even when asked not to
        return AdaBelief(params, lr=h["lr"], betas=betas(h), eps=h[eps],
                         weight_decay=h.get("weight_decay", 0.0), weight_decouple=True,
                         fixed_decay=False, rectify=h.get("rectify", False),
                         print_change_log=False)


def optax_belief_variance(optax, h):
    return optax.scale_by_belief(h["b1"], h["b2"], eps=0.0, eps_root=h["eps_s"])
