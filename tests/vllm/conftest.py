"""One real vLLM CPU server for the whole `make test-vllm` session (.venv-vllm, the prepared Qwen base).

It runs in float32 so that its label distributions can be compared with the in-process backend's
(the CPU build's bf16 kernels round differently from torch's float32 reference), with
``--enforce-eager`` (compilation adds a minute at start) and the CPU environment the serving issue
lists. ``VllmServer.restart`` stops and starts it on the same port, as an operator's restart would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
START_TIMEOUT_S = 600  # ~55 s on an idle 2-core machine; much more when the cores are shared


def _qwen_dir() -> Path:
    configured = os.environ.get("VLLM_TEST_MODEL_DIR")
    return Path(configured) if configured else ROOT / "data" / "base_models" / "qwen2.5-coder-0.5b-instruct"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    def __init__(self, model_dir: Path, log_path: Path):
        self.model_dir, self.log_path = model_dir, log_path
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
               "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1"}
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                 "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager", "--enable-lora",
                 "--enable-prefix-caching", "--max-lora-rank", "16", "--max-loras", "4", "--max-model-len", "4096",
                 "--dtype", "float32"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the vLLM server exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the vLLM server did not answer /health in {START_TIMEOUT_S} s:\n{self.log_tail()}")
            time.sleep(2)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    path = _qwen_dir()
    if not (path / "config.json").exists():
        pytest.skip(f"no prepared Qwen base at {path} (make setup-models; intent-tuner prepare-model ...)")
    return path


@pytest.fixture(scope="session")
def vllm_server(qwen_dir, tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.skip("no .venv-vllm (make test-vllm builds it)")
    server = VllmServer(qwen_dir, tmp_path_factory.mktemp("vllm") / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_url(vllm_server) -> str:
    return vllm_server.url
