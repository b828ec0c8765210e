"""Start-up CPU tuning: OpenMP wait policy and thread count chosen before torch loads, user values kept."""

from __future__ import annotations

import os
import subprocess
import sys

from cstoolkit.cpu import CpuSettings, choose_threads, configure_cpu, other_runnable_tasks

CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "CSTOOLKIT_CPU_TUNING")

PROBE = """
import os
from cstoolkit.cpu import configure_cpu
configure_cpu(others={others}, cores=2)
import torch
print(torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY"), os.environ.get("MKL_NUM_THREADS"))
"""


def _probe(others: int, **env: str) -> list[str]:
    """torch's thread count and the variables, in a fresh process where configure_cpu runs before torch."""
    base = {k: v for k, v in os.environ.items() if k not in CLEARED}
    out = subprocess.run([sys.executable, "-c", PROBE.format(others=others)], env={**base, **env},
                         capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.split()


def test_threads_leave_the_busy_cores_to_the_others():
    assert choose_threads(2, 0) == 2
    assert choose_threads(2, 1) == 1
    assert choose_threads(2, 13) == 1
    assert choose_threads(16, 3) == 13


def test_torch_runs_on_the_free_cores_and_waiting_threads_sleep():
    assert _probe(others=1) == ["1", "PASSIVE", "1"]
    # a quiet machine keeps torch's defaults (all cores, spinning): PASSIVE with 2 threads was 2.2x slower there
    assert _probe(others=0) == ["2", "None", "None"]


def test_user_set_variables_are_kept():
    assert _probe(others=1, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="ACTIVE") == ["2", "ACTIVE", "None"]
    assert _probe(others=1, CSTOOLKIT_CPU_TUNING="off")[1:] == ["None", "None"]  # torch's own defaults


def test_nothing_changes_once_torch_is_loaded():
    import torch  # noqa: F401  (the test process has it already)

    env: dict[str, str] = {}
    settings = configure_cpu(env, others=1, cores=2)
    assert env == {} and settings.changed == {} and "torch already imported" in settings.note


def test_a_runnable_task_is_counted_only_if_it_stays(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 3\nprocs_blocked 0\n")
    assert other_runnable_tasks(samples=3, interval=0, stat=str(stat)) == 2
    assert other_runnable_tasks(samples=1, stat=str(tmp_path / "missing")) == 0


def test_cli_logs_its_choice_with_debug():
    base = {k: v for k, v in os.environ.items() if k not in CLEARED}
    out = subprocess.run([sys.executable, "-m", "cstoolkit", "list-backbones", "--debug"], env=base,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stderr.splitlines() if "usable cores" in x)  # what it saw, and what it did
    assert "OMP_WAIT_POLICY=PASSIVE" in line or "torch's defaults" in line, line
    assert CpuSettings(2, 1, {"OMP_NUM_THREADS": "1"}).describe().endswith("OMP_NUM_THREADS=1")
