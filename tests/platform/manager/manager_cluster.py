"""A private single-node Ray cluster started with `ray start --head` for the manager tests and benchmark.

Started from this virtualenv (so `styleray` is on the PATH of its jobs), on 127.0.0.1 with every port picked
free (other clusters may run on the machine), a short unique --temp-dir (Unix socket paths are short), and
token auth switched on with a token of its own (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH): clients must send
it, as on a real cluster. Stopping it kills only the processes it started (never `ray stop`, which would stop
every cluster on the machine).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self, num_cpus: int = 2, object_store_mb: int = 256):
        self.temp_dir = tempfile.mkdtemp(prefix="srm-", dir="/tmp")
        self.token_path = os.path.join(self.temp_dir, "auth_token")
        with open(self.token_path, "w", encoding="utf-8") as f:
            f.write(uuid.uuid4().hex)
        self.port, self.dashboard_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
            RAY_USAGE_STATS_ENABLED="0",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=self.token_path,
        )
        self.log_path = os.path.join(self.temp_dir, "ray-start.log")
        cmd = [
            os.path.join(VENV_BIN, "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--port={self.port}", f"--dashboard-port={self.dashboard_port}", f"--num-cpus={num_cpus}",
            f"--temp-dir={self.temp_dir}", f"--object-store-memory={object_store_mb * 1024 * 1024}",
        ]
        for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                     "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
                     "--object-manager-port"):
            cmd.append(f"{flag}={free_port()}")
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def client_env(self) -> dict[str, str]:
        """What a client process needs: the token (Ray's own variables) and the venv first on PATH."""
        return {**self.env}

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the Jobs API answers and can start jobs (its agent registered)."""
        import requests

        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {open(self.token_path).read().strip()}"}
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = requests.get(f"{self.url}/api/jobs/", headers=headers, timeout=5)
                if r.status_code == 200:
                    return  # jobs may still meet "No available agent" for a moment: the manager retries
                last = f"HTTP {r.status_code}"
            except requests.RequestException as e:
                last = type(e).__name__
            time.sleep(0.5)
        raise RuntimeError(f"the Ray head at {self.url} was not ready in {timeout:.0f}s ({last}):\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]

    def processes(self):
        """This cluster's processes (the `ray start` process and everything under it)."""
        import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def find_process(self, *needles: str):
        """A live process of this cluster whose command line holds all ``needles``; None if there is none."""
        import psutil

        for p in self.processes():
            try:
                cmd = " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            if all(n in cmd for n in needles) and not cmd.startswith(("/bin/sh", "sh ", "/bin/bash", "bash ")):
                return p
        return None

    def stop(self) -> None:
        """SIGTERM to every process of this cluster at once, SIGKILL to what is left after a few seconds."""
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.proc.poll()
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
