"""INFERENCE_BACKEND=vllm with no server: /classify answers 503 with Retry-After, never a parse failure."""

from __future__ import annotations

import socket

from app.core.db import session_scope
from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.domain.prompt import build_system_prompt
from app.services.models import register_adapter


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_down_is_503(tmp_path):
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    settings = Settings(data_dir=tmp_path / "data", inference_backend="vllm",
                        vllm_url=f"http://127.0.0.1:{_closed_port()}", default_base_model="tiny-glm4")
    adapter_dir = tmp_path / "data" / "adapter"
    adapter_dir.mkdir(parents=True)
    (adapter_dir / "adapter_config.json").write_text("{}")
    with TestClient(create_app(settings)) as client:
        from app.ml.models.registry import resolve_base_model

        resolve_base_model("tiny-glm4", settings)
        with session_scope(settings) as session:
            register_adapter(session, settings, model_id="ft_down", name="x", base_model="tiny-glm4",
                             adapter_dir=adapter_dir, label_set=CMCC34_LABEL_SET.to_pairs(), max_input_length=None,
                             system_prompt=build_system_prompt(CMCC34_LABEL_SET), quantization="none")
        response = client.post("/classify", json={"model": "ft_down", "text": "您好[SEP]我要开通流量包"})
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "5"
        assert "does not answer" in response.json()["detail"]["message"]
        assert type(client.app.state.classifiers).__name__ == "VLLMBackend"
