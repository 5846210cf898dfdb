"""A real Prefect deployment path on one machine, for system tests and benchmarks (like
`prefect.testing.utilities`): a `prefect server` process, a `process` work pool, the `edit-chunk` and `bulk-edit`
deployment registered from this checkout, and worker processes. Pass `env` to every process you start.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DEPLOY_FLOWS = """
from flows.bulk_edit import bulk_edit
from flows.edit_chunk import edit_chunk
edit_chunk.from_source(source={repo!r}, entrypoint="flows/edit_chunk.py:edit_chunk").deploy(
    name="edit-chunk", work_pool_name={pool!r}, print_next_steps=False)
bulk_edit.from_source(source={repo!r}, entrypoint="flows/bulk_edit.py:bulk_edit").deploy(
    name="bulk-edit", work_pool_name={pool!r}, print_next_steps=False)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class LocalCluster:
    """`with LocalCluster(home, extra_env) as cluster:` → server up, pool created, edit-chunk and bulk-edit deployed."""

    def __init__(self, home: Path, extra_env: dict[str, str] | None = None, pool: str = "local-process-pool"):
        self.home, self.pool = Path(home), pool
        self.api = f"http://127.0.0.1:{free_port()}/api"
        self.env = {**os.environ, **(extra_env or {}), "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api,
                    "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
                    "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
        self.server: subprocess.Popen | None = None

    def __enter__(self) -> LocalCluster:
        port = self.api.rsplit(":", 1)[1].split("/")[0]
        self.server = self.spawn(["prefect", "server", "start", "--host", "127.0.0.1", "--port", port], "server")
        try:
            wait_until(self.healthy, 120, "the Prefect server")
            self.prefect(["work-pool", "create", self.pool, "--type", "process"])
            subprocess.run([sys.executable, "-c", DEPLOY_FLOWS.format(repo=str(REPO), pool=self.pool)],
                           env=self.env, check=True, capture_output=True, cwd=REPO)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            stop(self.server)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def prefect(self, args: list[str]) -> str:
        return subprocess.run([sys.executable, "-m", "prefect", *args], env=self.env, check=True,
                              capture_output=True, text=True).stdout

    def spawn(self, args: list[str], log_name: str, hide: tuple[Path, ...] = ()) -> subprocess.Popen:
        """`python -m ARGS` in its own session (so `stop` takes its children too), logging to home/<log_name>.log.
        `hide`: folders it (and everything it starts) sees empty, as a pod does not share the caller's disk: a
        mount namespace of its own (`unshare -m`, root) with a tmpfs over each."""
        command = [sys.executable, "-m", *args]
        if hide:
            mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(folder))}" for folder in hide)
            command = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                       f"{mounts} && exec {shlex.join(command)}"]
        log = open(self.home / f"{log_name}.log", "w")
        return subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=REPO)

    def start_worker(self, name: str, limit: int = 1, hide: tuple[Path, ...] = ()) -> subprocess.Popen:
        return self.spawn(["prefect", "worker", "start", "--pool", self.pool, "--type", "process", "--limit",
                           str(limit), "--name", name], name, hide)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 20) -> None:
    """A process and everything it started (a worker's flow-run processes); SIGKILL after `grace` seconds."""
    for signum in (sig, signal.SIGKILL):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            process.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait(10)
