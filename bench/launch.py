"""Starting multi-process PyTorch programs (``torchrun``) from Python, and cleaning up.

Used by the distributed benchmark and the distributed tests.  The program runs under
``python -m torch.distributed.run --standalone``, which finds a free port itself.  A
timeout, an error or an interrupt of the caller ends the launcher and every worker it
started (torchrun starts each worker in a session of its own, so ending the
launcher's process group is not enough), and nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

GRACE = 10  # seconds for torchrun to end its workers on SIGTERM before all are killed


class LaunchError(RuntimeError):
    """The program failed or ran out of time; the message ends with its output."""


def torchrun(program: Sequence[str], nprocs: int, timeout: float,
             env: dict[str, str] | None = None) -> str:
    """Run ``program`` (a script path or ``-m module``, then its arguments) on ``nprocs``
    processes of this machine; returns its output (stdout and stderr together).

    Raises :class:`LaunchError` if it exits with an error or runs longer than
    ``timeout`` seconds; in every case its processes are gone when this returns.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nprocs}", *program]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True,
                               env=None if env is None else {**os.environ, **env})
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end(process)
        try:  # a straggler that escaped the kill could hold the pipe open: do not wait on it
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            output = "(output lost: a process below the launcher kept its pipe open)"
        raise LaunchError(f"{' '.join(program)} ran over {timeout:.0f} s:\n{output}") from None
    except BaseException:  # an interrupt of the caller: leave nothing running
        _end(process)
        raise
    if process.returncode != 0:
        raise LaunchError(f"{' '.join(program)} failed (exit {process.returncode}):\n{output}")
    return output


def _end(process: subprocess.Popen) -> None:
    """End the launcher and all processes below it: SIGTERM first (torchrun passes it
    on to its workers), then SIGKILL for whatever is left."""
    below = _descendants(process.pid)
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, read from /proc (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:  # the parent is the 2nd field after the command, which may hold spaces
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
