"""Where a rule can run: backend x device x path (eager or compiled)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mvn_core import backends

# Libraries with a compile hook worth checking as a path of its own.
COMPILED = ("jax",)


@dataclass(frozen=True)
class Target:
    backend: str
    device: Any = None
    compiled: bool = False

    @property
    def id(self) -> str:
        parts = [self.backend, device_name(self.device)]
        return "-".join(p for p in parts if p) + ("-compiled" if self.compiled else "")

    def dtypes(self) -> list[str]:
        """The floating dtype names this target supports."""
        return list(backends.get(self.backend).dtypes(self.device))


def device_name(device) -> str:
    """A short name of a device of any backend: cpu, cpu0, cuda0, no_float64, ..."""
    if device is None:
        return ""
    name = str(device)
    for noise in ("array_api_strict.Device(", ")", "'", "TFRT_"):
        name = name.replace(noise, "")
    return name.replace(":", "").replace("(id=", "").replace(" ", "").lower()


def targets() -> list[tuple[Target, str | None]]:
    """Every target, with None or the reason it cannot run here (missing library/device).

    Libraries that are not installed still yield one placeholder target, so that a
    test table shows them as skipped rather than silently absent.
    """
    out = []
    for name in backends.NAMES:
        reason = backends.get(name).unavailable_reason()
        if reason is not None:
            out.append((Target(name), reason))
            continue
        for device in devices(name):
            out.append((Target(name, device), None))
            if name in COMPILED:
                out.append((Target(name, device, compiled=True), None))
    return out


def devices(name: str) -> list:
    """The devices of backend ``name`` worth checking."""
    lib = backends.get(name)
    if name == "array_api_strict":
        # device1/device2 behave like the CPU device; these two differ in dtypes.
        keep = ("CPU_DEVICE", "no_float64", "no_x64")
        return [d for d in lib.devices() if any(k in str(d) for k in keep)]
    return lib.devices()
