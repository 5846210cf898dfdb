"""Stop what a process started if it dies without cleaning up (SIGKILL runs no handler):

    python -m imagic.watchdog PID

`imagic run` starts one beside itself, so that Prefect's temporary server, a child process, never outlives
a killed run. It remembers the process's descendants while it lives, then stops those still running.
"""

from __future__ import annotations

import os
import sys
import time

import psutil


def watch(pid: int, interval_s: float = 0.5) -> None:
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    known: dict[int, psutil.Process] = {}
    while parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE:
        try:
            known.update((p.pid, p) for p in parent.children(recursive=True) if p.pid != os.getpid())
        except psutil.NoSuchProcess:
            break
        time.sleep(interval_s)
    left = [p for p in known.values() if p.is_running()]  # is_running also checks the start time: no pid reuse
    for process in left:
        process.terminate()
    _, alive = psutil.wait_procs(left, timeout=5)
    for process in alive:
        process.kill()


if __name__ == "__main__":
    watch(int(sys.argv[1]))
