"""Process helpers for tests/observability (imported as `obs_procs`): a real CPU `vllm serve`
and a real Prometheus. Both run in their own process group and are always killed (the whole
group) at teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SERVER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_USE_AOT_COMPILE": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it."""
    if proc is None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)  # children that outlived the leader
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def log_tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def model_dir(name: str = "smollm2") -> str:
    out = subprocess.run([str(VENV_BIN / "python"), "-m", "vllm_defensive.models", "ensure", name],
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), check=True,
                         capture_output=True, text=True, timeout=900)
    return out.stdout.strip().splitlines()[-1]


class Server:
    """`vllm serve <model> ...` on a free port; `url` once healthy."""

    def __init__(self, model: str, args: list[str], log_dir: Path, timeout: float = 420):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / "vllm.log"
        cmd = [str(VENV_BIN / "vllm"), "serve", model, "--host", "127.0.0.1", "--port",
               str(self.port), *args]
        env = dict(os.environ, **SERVER_ENV)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # vLLM manages it
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         cwd=log_dir, start_new_session=True)
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n"
                                   + log_tail(self.log))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vllm serve not healthy after {timeout}s:\n" + log_tail(self.log))

    def stop(self) -> None:
        kill_group(self.proc, timeout=30)


class Prometheus:
    """The real `prometheus` binary scraping `target` (host:port) every second."""

    def __init__(self, target: str, work: Path, binary: str = "prometheus", timeout: float = 60):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "prometheus.log"
        cfg = work / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: vllm\n    metrics_path: /metrics\n"
            "    scrape_interval: 1s\n    scrape_timeout: 900ms\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        data = work / "tsdb"
        data.mkdir(exist_ok=True)
        cmd = [binary, f"--config.file={cfg}", f"--storage.tsdb.path={data}",
               f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d",
               "--log.level=warn"]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=work)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("prometheus exited:\n" + log_tail(self.log))
                try:
                    if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("prometheus not ready:\n" + log_tail(self.log))
                time.sleep(0.3)
        except BaseException:
            self.stop()
            raise

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        r = httpx.get(self.url + "/api/v1/query", params=params, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def targets_up(self) -> bool:
        r = httpx.get(self.url + "/api/v1/targets", timeout=10).json()
        return any(t["health"] == "up" for t in r["data"]["activeTargets"])

    def stop(self) -> None:
        kill_group(self.proc, timeout=10)


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
