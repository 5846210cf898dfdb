"""The watchdog beside `imagic run`: when the process it watches dies without cleaning up, what it started stops."""

import subprocess
import sys
import time

import psutil

from tests.cluster import wait_until

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_killed_process_leaves_no_child_behind():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    watchdog = subprocess.Popen([sys.executable, "-m", "imagic.watchdog", str(parent.pid)])
    try:
        time.sleep(1.5)  # the watchdog has seen the child
        assert child.is_running() and watchdog.poll() is None
        parent.kill()  # SIGKILL: no handler of the parent's runs
        parent.wait()
        wait_until(lambda: watchdog.poll() is not None, 15, "the watchdog to finish")
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        for process in (parent, watchdog):
            if process.poll() is None:
                process.kill()
        if child.is_running():
            child.kill()


def test_the_watchdog_of_a_process_that_is_gone_returns_at_once():
    from imagic.watchdog import watch

    started = time.monotonic()
    watch(2**22 + 1)  # past Linux's largest pid: no such process
    assert time.monotonic() - started < 1.0
