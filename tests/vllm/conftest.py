"""One real vLLM CPU server for the whole `make test-vllm` session (.venv-vllm, the prepared Qwen base)."""

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


def _qwen_dir() -> Path:
    configured = os.environ.get("VLLM_TEST_MODEL_DIR")
    return Path(configured) if configured else ROOT / "data" / "base_models" / "qwen2.5-coder-0.5b-instruct"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    path = _qwen_dir()
    if not (path / "config.json").exists():
        pytest.skip(f"no prepared Qwen base at {path} (make setup-models; intent-tuner prepare-model ...)")
    return path


@pytest.fixture(scope="session")
def vllm_url(qwen_dir, tmp_path_factory):
    if not VLLM_PYTHON.exists():
        pytest.skip("no .venv-vllm (make test-vllm builds it)")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(qwen_dir),
             "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--enable-lora",
             "--enable-prefix-caching", "--max-lora-rank", "16", "--max-model-len", "4096"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            if process.poll() is not None:
                pytest.fail(f"the vLLM server exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not answer /health:\n{log_path.read_text()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
