"""CPU thread settings (spatiallock.threads): chosen before torch loads, the user's own kept, fewer threads while
other processes take cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from spatiallock import threads

OPENMP = ("SPATIALLOCK_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
PROBE = """
import json, os, sys
from spatiallock.cli import main
code = main(sys.argv[1:])
import torch
from spatiallock import threads
print(json.dumps({"code": code, "torch_threads": torch.get_num_threads(), "adaptive": threads._state["adaptive"],
                  **{n: os.environ.get(n) for n in OPENMP}}))
""".replace("OPENMP", repr(OPENMP))


def command(env: dict, *argv: str) -> tuple[dict, str]:
    """A command run as a user runs it (a fresh Python, the settings made before torch loads)."""
    clean = {k: v for k, v in os.environ.items() if k not in OPENMP}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), done.stderr


@pytest.fixture(scope="module")
def defaults():
    done = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env={k: v for k, v in os.environ.items() if k not in OPENMP}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return int(done.stdout)


def run_params(env: dict) -> dict:
    result, stderr = command(env, "params", "--base", "sd-v1-4")
    assert result["code"] == 0, stderr
    return result


def test_a_command_measures_by_default(defaults):
    result = run_params({})
    assert result["GOMP_SPINCOUNT"] is None and result["OMP_WAIT_POLICY"] is None
    assert result["OMP_NUM_THREADS"] is None and result["torch_threads"] == defaults
    assert result["adaptive"] is True


def test_settings_the_user_made_are_kept():
    result = run_params({"OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": "77"})
    assert result["OMP_NUM_THREADS"] == "1" and result["GOMP_SPINCOUNT"] == "77" and result["torch_threads"] == 1
    assert result["adaptive"] is False  # the user chose the count: not changed while sampling
    result = run_params({"OMP_WAIT_POLICY": "PASSIVE"})
    assert result["OMP_WAIT_POLICY"] == "PASSIVE" and result["adaptive"] is True


def test_spatiallock_threads_fixes_the_count_or_keeps_torchs_settings(defaults):
    result = run_params({"SPATIALLOCK_THREADS": "1"})
    assert result["torch_threads"] == 1 and result["OMP_NUM_THREADS"] == "1" and result["adaptive"] is False
    result = run_params({"SPATIALLOCK_THREADS": "torch"})
    assert result["OMP_NUM_THREADS"] is None
    assert result["torch_threads"] == defaults and result["adaptive"] is False


def test_a_bad_spatiallock_threads_is_one_warning_line():
    result, stderr = command({"SPATIALLOCK_THREADS": "many"}, "params", "--base", "sd-v1-4")
    assert result["code"] == 0 and result["adaptive"] is True
    (line,) = [line for line in stderr.splitlines() if "SPATIALLOCK_THREADS" in line]
    assert line.startswith("spatiallock: warning:") and "'many'" in line


def test_too_late_once_torch_has_loaded():
    environ: dict = {}
    assert "torch" in sys.modules and threads.configure_threads(environ) == "torch" and environ == {}


class Clock:
    """Fake /proc/stat and process times: `others` cores busy besides this process's own `own` cores."""

    def __init__(self, monkeypatch, cpus: int = 2):
        self.t, self.busy, self.own = 100.0, 0, 0.0
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.t)
        monkeypatch.setattr(threads, "_own_seconds", lambda: self.own)
        monkeypatch.setattr(threads, "_TICKS_PER_S", 100)

        monkeypatch.setattr(threads, "_busy_ticks", lambda: (self.busy, cpus))

    def advance(self, seconds: float, own: float, others: float) -> None:
        self.t += seconds
        self.own += own * seconds
        self.busy += round((own + others) * seconds * 100)


def test_fewer_threads_while_other_processes_take_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_state", {"adaptive": True, "last": None, "most": 2})
    clock = Clock(monkeypatch)
    try:
        torch.set_num_threads(2)
        threads.adapt_threads()  # the first call only starts measuring
        clock.advance(1.0, own=2.0, others=0.0)
        threads.adapt_threads()
        assert torch.get_num_threads() == 2  # alone: every core
        clock.advance(1.0, own=1.0, others=1.0)  # a busy loop beside it
        threads.adapt_threads()
        assert torch.get_num_threads() == 1
        clock.advance(0.1, own=1.0, others=0.0)  # too soon to measure again
        threads.adapt_threads()
        assert torch.get_num_threads() == 1
        clock.advance(1.0, own=1.0, others=2.5)  # even with every core taken: at least one thread
        threads.adapt_threads()
        assert torch.get_num_threads() == 1
        clock.advance(1.0, own=1.0, others=0.2)  # the neighbour gone: all threads again, no more than at start
        threads.adapt_threads()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_nothing_changes_unless_chosen_at_start(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_state", {"adaptive": False})
    clock = Clock(monkeypatch)
    threads.adapt_threads()
    clock.advance(1.0, own=0.5, others=2.0)
    threads.adapt_threads()
    assert torch.get_num_threads() == before


def test_the_pipeline_measures_once_per_step_on_cpu(tiny_small_base, monkeypatch):
    from spatiallock.layout import Layout
    from spatiallock.pipelines import diffusion
    from spatiallock.pipelines.diffusion import SpatialLockPipeline

    calls = []
    monkeypatch.setattr(diffusion, "adapt_threads", lambda: calls.append(torch.get_num_threads()))
    pipe = SpatialLockPipeline.from_pretrained(tiny_small_base)
    pipe.set_progress_bar_config(disable=True)
    pipe(layouts=[Layout("a red circle", ("red circle",), ((0.1, 0.1, 0.6, 0.6),))], num_inference_steps=3)
    assert len(calls) == 3
