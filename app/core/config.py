"""All settings in one place, read from the environment (and an optional ``.env``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = PROJECT_ROOT / "configs"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(default=Path("data"), description="Database, uploads, jobs, models, reports.")
    database_url: str | None = Field(default=None, description="Defaults to SQLite in DATA_DIR.")
    api_key: str | None = Field(
        default=None, description="When set, every endpoint but /health, /health/ready and the docs needs it.")
    max_upload_bytes: int = Field(
        default=50 * 1024 * 1024, ge=1,
        description="Largest dataset file; a request body is refused (413) as soon as it is known to pass it.")
    metrics_require_key: bool = Field(
        default=False, description="GET /metrics needs the bearer API_KEY too (default: open to the scraper).")
    default_base_model: str = "qwen2.5-coder-0.5b-instruct"
    default_config: str | None = Field(
        default=None, description="Recipe for jobs that name none; unset: cmcc34_qlora_system_prompt with a GPU, "
                                  "cpu_small without one. Set it where the API runs apart from a GPU worker.")
    # Limits a training job must stay within, checked at POST /jobs (a job past them would hold a worker for days).
    max_train_steps: int = Field(default=100_000, ge=1, description="Most optimizer steps one job may run.")
    max_train_epochs: float = Field(default=100.0, gt=0, description="Most epochs one job may run.")
    # Base-model directories not in the built-in registry: "name=path,name2=path2".
    extra_base_models: str = ""
    base_models_dir_override: Path | None = Field(
        default=None, validation_alias="BASE_MODELS_DIR",
        description="Where prepared base models are cached (default DATA_DIR/base_models); shareable.")
    adapter_cache_size: int = 2
    worker_poll_seconds: float = 1.0
    worker_heartbeat_seconds: float = 5.0
    # A running job whose heartbeat is older than this is considered orphaned, and a worker not seen for
    # this long is not live (GET /health/ready).
    worker_stale_seconds: float = 60.0
    # How many times a job orphaned by a dead worker is resumed before it is failed.
    max_job_attempts: int = 3
    worker_gpus: int | None = Field(
        default=None, ge=1, le=64,
        description="GPUs this worker takes for itself out of those it sees, each held by a lock in "
                    "DATA_DIR/.gpu-locks (replicas that see every GPU of a host then take one each); "
                    "unset: all it sees.")
    worker_labels: str = Field(
        default="", description="What this worker offers, e.g. 'gpu,a100': it claims only jobs whose "
                                "resources.labels it has all of (and every job without labels). Checked by "
                                "the worker at its start (app.domain.resources.parse_labels).")
    device: str | None = Field(default=None, description="cuda, cpu; default: cuda when available.")
    glm4_9b_path: Path | None = Field(
        default=None, validation_alias="GLM4_9B_PATH",
        description="A local GLM-4-9B-0414 folder (config.json, *.safetensors, tokenizer): the production base.")
    # `make serve` / `python -m app.serve`: where the API listens.
    host: str = Field(default="127.0.0.1", description="Interface the API binds (0.0.0.0 in a container).")
    port: int = Field(default=8000, ge=1, le=65535)
    # `make demo` (app.demo): the recipe, base model and step budget of its job.
    demo_config: str = "cpu_small"
    demo_base_model: str | None = Field(default=None, description="Default: the recipe's, else DEFAULT_BASE_MODEL.")
    demo_max_steps: int | None = Field(default=None, ge=1, description="Overrides the recipe's max_steps.")
    # `make serve` (app.serve): how many worker processes it starts and restarts when one dies.
    serve_workers: int = Field(default=1, ge=0, description="0: the API only (workers run elsewhere).")
    worker_restart_min_seconds: float = Field(default=1.0, gt=0, description="First wait before a restart.")
    worker_restart_max_seconds: float = Field(default=60.0, gt=0, description="The wait doubles up to this.")
    # Bounds of one POST /classify, checked before any model is loaded (413 beyond them).
    classify_max_texts: int = Field(default=256, ge=1, description="Dialogues in one /classify request at most.")
    classify_max_text_chars: int = Field(
        default=100_000, ge=1, description="Characters of one dialogue at most in a /classify request.")
    classify_max_input_length: int = Field(
        default=1024, ge=16,
        description="Prompt tokens a zero-shot model (or an adapter whose recipe recorded none) sees at most; "
                    "a longer dialogue loses its end, as in training.")

    @field_validator("worker_gpus", mode="before")
    @classmethod
    def _unset_when_empty(cls, value):
        return None if value == "" else value  # WORKER_GPUS= (compose passes an unset variable as "")

    classify_strategy: Literal["trie", "full"] = Field(
        default="trie", description="How score mode scores a label when a request names no strategy: trie (its "
                                    "distinguishing tokens, the default) or full (its whole answer).")
    # Cross-request micro-batching of the in-process backend (app.ml.infer.batching), per base model.
    classify_batch_window_ms: float = Field(default=2.0, ge=0, description="How long the first request of a "
                                            "batch waits for others to join it.")
    classify_max_batch_texts: int = Field(default=16, ge=1, description="Dialogues in one shared forward at most.")
    classify_queue_size: int = Field(default=64, ge=1, description="Requests waiting per base model at most; "
                                     "beyond it /classify answers 503 with Retry-After.")
    classify_retry_after_seconds: int = Field(default=1, ge=1, description="Retry-After of a 503 for a full queue.")
    # Where /classify and evaluations run: in this process (hf) or on a vLLM OpenAI-compatible server (vllm).
    inference_backend: Literal["hf", "vllm"] = Field(default="hf", description="hf: transformers in-process; "
                                                     "vllm: VLLM_URL, and the API loads no model.")
    vllm_url: str = Field(default="http://127.0.0.1:8001", description="Base URL of the vLLM server (no /v1).")
    vllm_model: str | None = Field(default=None, description="The served base model's name on the vLLM server "
                                   "(default: the first of its /v1/models).")
    vllm_timeout_seconds: float = Field(default=120.0, gt=0, description="Per request to the vLLM server.")
    vllm_data_dir: Path | None = Field(default=None, description="DATA_DIR as the vLLM server sees it, for adapter "
                                       "paths (default: the same path; compose mounts one volume on both).")

    @property
    def max_form_body_bytes(self) -> int:
        """Largest multipart (upload) request body: the file plus room for the envelope and the name field."""
        return self.max_upload_bytes + 64 * 1024

    @property
    def max_json_body_bytes(self) -> int:
        """Largest other request body: what the largest valid /classify needs (every character of every text
        escaped as \\uXXXX), and never less than an upload."""
        largest_classify = self.classify_max_texts * (self.classify_max_text_chars * 6 + 8) + 1024 * 1024
        return max(self.max_form_body_bytes, largest_classify)

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'intent_tuner.db').resolve()}"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def base_models_dir(self) -> Path:
        return self.base_models_dir_override or self.data_dir / "base_models"

    def stored_path(self, path: Path | str) -> str:
        """How a file under DATA_DIR is stored in the database: relative to DATA_DIR, so that moving
        DATA_DIR (another volume, another host's mount point) keeps every row valid."""
        path = Path(path).resolve()
        try:
            return path.relative_to(self.data_dir.resolve()).as_posix()
        except ValueError:
            return str(path)  # outside DATA_DIR (a local adapter folder): kept as it is

    def resolve_stored_path(self, stored: str) -> Path:
        """The file a stored path names today (absolute paths of older rows are taken as they are)."""
        return self.data_dir / stored if not Path(stored).is_absolute() else Path(stored)

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"


@lru_cache
def get_settings() -> Settings:
    return Settings()
