"""CPU threads: settings that hold up when something else runs on the machine.

torch's own settings on a CPU use one OpenMP thread per core, and each thread spins (busy-waits) for a while
between parallel regions instead of sleeping. On a quiet machine that is the fastest there is; beside any other
busy process (a browser, a second sampling job, a training run) the threads lose their cores at different moments
and spin at every barrier waiting for the one that was descheduled: sampling then ran 3 to 30 times slower.

Each command calls `configure_threads()` before torch loads, and the diffusion pipeline calls `adapt_threads()`
once per denoising step on CPU. What they do depends on the environment:

    SPATIALLOCK_THREADS unset   as many threads as there are cores no other process uses (at least one, at most
                                torch's own count), measured from /proc/stat about twice a second while sampling
    SPATIALLOCK_THREADS=N       N threads, never changed
    SPATIALLOCK_THREADS=torch   torch's own settings, never changed (how sampling ran before)

Settings the user made are kept: OMP_NUM_THREADS in the environment fixes the count (no measuring), and
OMP_WAIT_POLICY or GOMP_SPINCOUNT reach OpenMP as they are. Where there is no /proc/stat (macOS, Windows) the count
stays torch's. Measured in benchmarks/sample_speed.py --busy (docs/benchmarks.md, "Speed on a busy machine").
"""

from __future__ import annotations

import os
import sys
import time

VARIABLE = "SPATIALLOCK_THREADS"
HELP = """\
threads: on a CPU, sampling uses as many threads as there are cores no other process is using, measured while
it runs. SPATIALLOCK_THREADS=N fixes the count, SPATIALLOCK_THREADS=torch keeps torch's own settings;
OMP_NUM_THREADS, OMP_WAIT_POLICY and GOMP_SPINCOUNT are kept as set."""
INTERVAL_S = 0.5  # how often the load of other processes is measured
BUSY_CORE = 0.5  # a core counts as taken when other processes used at least this share of it

_state: dict = {"adaptive": False}


def configure_threads(environ=None) -> str:
    """Choose this process's thread settings, before torch loads (OMP_NUM_THREADS for SPATIALLOCK_THREADS=N);
    returns the mode chosen: `auto` (measured while sampling), `fixed` or `torch`. Returns `torch` and changes
    nothing when torch has loaded already."""
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules:
        return "torch"
    value = environ.get(VARIABLE, "").strip().lower()
    if value == "torch":
        return "torch"
    if value and (not value.isdigit() or int(value) < 1):
        print(f"spatiallock: warning: {VARIABLE}={value!r} is not a thread count or 'torch'; ignored",
              file=sys.stderr)  # fmt: skip
        value = ""
    if value:
        environ["OMP_NUM_THREADS"] = value
    if "OMP_NUM_THREADS" in environ:
        return "fixed"
    _state.update(adaptive=True, last=None)
    return "auto"


_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_ticks() -> tuple[int, int] | None:
    """(clock ticks all CPUs spent busy since boot, the number of CPUs) from /proc/stat, or None where there is
    no /proc. The CPUs are those it lists (in a container: the host's, whose load is what the threads compete
    with)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        values = [int(v) for v in lines[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit()) or 1
    return sum(values) - values[3] - values[4], cpus  # all but idle and iowait


def _own_seconds() -> float:
    return time.process_time()


def adapt_threads() -> None:
    """Use as many threads as there are cores other processes leave free (at least one), measured over the time
    since the last measurement; at most every INTERVAL_S. Does nothing unless `configure_threads` chose `auto`."""
    if not _state["adaptive"]:
        return
    now = time.monotonic()
    last = _state.get("last")
    if last is not None and now - last[0] < INTERVAL_S:
        return
    measured = _busy_ticks()
    if measured is None:
        _state["adaptive"] = False
        return
    busy, cpus = measured
    own = _own_seconds()
    _state["last"] = (now, busy, own)
    if last is None:
        return
    import torch

    if "most" not in _state:
        _state["most"] = torch.get_num_threads()  # torch's choice for this machine: the most ever used
    others = ((busy - last[1]) / _TICKS_PER_S - (own - last[2])) / (now - last[0])  # cores others used
    free = cpus - int(others + 1 - BUSY_CORE)
    threads = max(1, min(_state["most"], free))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
