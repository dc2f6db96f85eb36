"""Section 3: serving. Every way of answering /classify, side by side on the same model, adapter and
dialogues, through real servers at 1, 4 and 16 concurrent clients.

The API runs as a real uvicorn process on a fresh DATA_DIR holding the benchmark adapter (registered
like a finished job's model); clients are threads, each sending one-text requests over HTTP. Rows:

- ``generate``: the upstream method: the full prompt runs for every request, decoded greedily, parsed.
- ``score, full answers``: the system prompt cached, then the dialogue and all 34 candidate answers.
- ``score, trie``: the system prompt cached, then the dialogue and the trie's branching nodes only,
  read as the distribution constrained decoding samples from (``app.ml.infer.trie``).
- ``trie, lock``: the same with the micro-batcher held to one request per forward (what the per-model
  lock did): the batcher's gain is the ratio between the two.
- ``vLLM guided choice``: what a practitioner would do instead: the vLLM server's chat endpoint with
  ``structured_outputs.choice`` = the 34 answers and the adapter, straight from the client.
- ``vLLM via the API``: INFERENCE_BACKEND=vllm (the API loads no model), same trie distribution.

Tokens run per request: in-process, counted from the tokenizer (what the forward passes take);
on vLLM, read from its Prometheus counters (prompt tokens minus prefix-cache hits, plus generated).
"Agreement" is the share of dialogues whose label equals the trie's (in-process, 1 client).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from app.domain.labels import LabelSet
from app.domain.records import Record
from bench.report import SectionResult, Table, bar_group, new_figure, percentile, ratio, save_figure

BENCH_MODEL_ID = "bench-adapter"
CONCURRENCY = (1, 4, 16)
REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"


@dataclass
class AdapterUnderTest:
    adapter_dir: Path
    base_model: str
    system_prompt: str
    label_set: LabelSet
    quantization: str
    description: str  # e.g. "LoRA adapter trained 16 steps in this run"
    max_input_length: int | None = None  # the training recipe's (the API cuts dialogues the same way)


@dataclass
class LevelRun:
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def texts_per_s(self) -> float | None:
        return len(self.latencies_ms) / self.wall_s if self.wall_s else None


@dataclass
class EngineRun:
    name: str
    levels: dict[int, LevelRun] = field(default_factory=dict)
    labels: list[int | None] = field(default_factory=list)  # 1-client run, per dialogue
    raw_outputs: list[str | None] = field(default_factory=list)
    tokens_per_request: float | None = None
    tokens_note: str = ""
    unparseable: int = 0
    error: str | None = None

    def p(self, clients: int, q: float) -> float | None:
        level = self.levels.get(clients)
        return percentile(level.latencies_ms, q) if level else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited ({process.returncode}): {log_path.read_text(errors='replace')[-1500:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"no answer from {url} in {timeout_s:.0f} s")


class Server:
    """A subprocess in its own session, stopped with its children."""

    def __init__(self, argv: list[str], env: dict, health_url: str, log_path: Path, timeout_s: float):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=REPO_ROOT)
        try:
            _wait_http(health_url, self.process, timeout_s, log_path)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_api(service_dir: Path, base_model: str, port: int, log_path: Path, **settings) -> Server:
    env = {**os.environ, "DATA_DIR": str(service_dir), "DEFAULT_BASE_MODEL": base_model, "API_KEY": "",
           "DATABASE_URL": "", "EXTRA_BASE_MODELS": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("DATABASE_URL")
    env.update({key.upper(): str(value) for key, value in settings.items()})
    argv = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning"]
    return Server(argv, env, f"http://127.0.0.1:{port}/health", log_path, timeout_s=120)


def start_vllm(model_dir: Path, port: int, log_path: Path) -> Server:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1"}
    argv = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--enable-lora",
            "--enable-prefix-caching", "--max-lora-rank", "64", "--max-model-len", "4096"]
    return Server(argv, env, f"http://127.0.0.1:{port}/health", log_path, timeout_s=900)


def _prepare_service_dir(service_dir: Path, base_model_name: str, base_model_dir: Path):
    from app.core.config import Settings

    shutil.rmtree(service_dir, ignore_errors=True)
    (service_dir / "base_models").mkdir(parents=True)
    # The prepared base model is linked, not rebuilt: resolve_base_model finds it complete.
    (service_dir / "base_models" / base_model_name).symlink_to(Path(base_model_dir).resolve(), target_is_directory=True)
    return Settings(data_dir=service_dir, database_url=None, api_key=None, default_base_model=base_model_name,
                    extra_base_models="")


def _register_adapter(settings, adapter: AdapterUnderTest) -> str:
    """Insert the adapter into the service database the way a finished training job registers its model."""
    from app.core.db import session_factory
    from app.core.db import run_migrations
    from app.services.models import register_adapter

    run_migrations(settings)
    with session_factory(settings)() as session:
        register_adapter(session, settings, model_id=BENCH_MODEL_ID, name="benchmark adapter",
                         base_model=adapter.base_model, adapter_dir=Path(adapter.adapter_dir),
                         label_set=adapter.label_set.to_pairs(), system_prompt=adapter.system_prompt,
                         quantization=adapter.quantization, max_input_length=adapter.max_input_length)
        session.commit()
    return BENCH_MODEL_ID


def _drive(call, texts: list[str], clients: int) -> tuple[LevelRun, list]:
    """``clients`` threads share ``texts`` (one text per request); results in text order."""
    level = LevelRun(clients)
    results: list = [None] * len(texts)

    def one(i: int):
        began = time.perf_counter()
        results[i] = call(texts[i])
        return (time.perf_counter() - began) * 1000.0

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        level.latencies_ms = list(pool.map(one, range(len(texts))))
    level.wall_s = time.perf_counter() - began
    return level, results


def _api_caller(url: str, payload: dict):
    import httpx

    client = httpx.Client(base_url=url, timeout=600)

    def call(text: str):
        response = client.post("/classify", json={**payload, "text": text})
        if response.status_code != 200:
            raise RuntimeError(f"/classify answered {response.status_code}: {response.text[:300]}")
        prediction = response.json()["predictions"][0]
        return prediction["intent_id"], prediction.get("raw_output")

    return call


def _measure(run: EngineRun, call, texts: list[str], warmup_text: str, progress) -> None:
    try:
        call(warmup_text)  # loads the model / adapter, builds the prefix cache: not measured
        for clients in CONCURRENCY:
            level, results = _drive(call, texts, clients)
            run.levels[clients] = level
            if clients == 1:
                run.labels = [r[0] for r in results]
                run.raw_outputs = [r[1] for r in results]
                run.unparseable = sum(1 for r in results if r[0] is None)
            progress(f"[serving] {run.name}: {clients} clients, p50 {percentile(level.latencies_ms, 50):.0f} ms, "
                     f"{level.texts_per_s:.2f} texts/s")
    except Exception as exc:  # a benchmark reports what it could not measure
        run.error = f"{type(exc).__name__}: {exc}"[:300]
        progress(f"[serving] {run.name}: not measured: {run.error}")


def _vllm_counters(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"vllm:prompt_tokens", "vllm:generation_tokens", "vllm:prefix_cache_hits", "vllm:request_success"}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name in wanted:
            totals[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals


def _vllm_tokens_per_request(url: str, before: dict, after: dict, requests: int) -> float | None:
    if not requests or "vllm:prompt_tokens" not in after:
        return None
    computed = (after["vllm:prompt_tokens"] - before.get("vllm:prompt_tokens", 0)
                - (after.get("vllm:prefix_cache_hits", 0) - before.get("vllm:prefix_cache_hits", 0))
                + after.get("vllm:generation_tokens", 0) - before.get("vllm:generation_tokens", 0))
    return computed / requests


def run_serving_section(base_model_name: str, base_model_dir: Path, records: list[Record], warmup_text: str,
                        label_set: LabelSet, plot_path: Path, work_dir: Path, *, adapter: AdapterUnderTest,
                        device: str | None = None, vllm_skipped_by: str | None = None,
                        vllm_only: bool = False, progress=print) -> SectionResult:
    from app.domain.prompt import format_answer, parse_answer
    from app.ml.infer.scoring import LabelScorer, render_prompt_ids
    from app.ml.models.loading import load_tokenizer
    from app.ml.text.encoding import shared_prefix_ids

    began = time.perf_counter()
    texts = [r.dialogue for r in records]
    service_dir = work_dir / "serving-service"
    settings = _prepare_service_dir(service_dir, base_model_name, base_model_dir)
    model = _register_adapter(settings, adapter)
    device_settings = {"device": device} if device else {}
    runs: list[EngineRun] = []

    # In-process: one API with the micro-batcher, one held to a batch of one (the old lock's behaviour).
    batched_port, lock_port = _free_port(), _free_port()
    if not vllm_only:  # --serving-vllm-only: the vLLM rows alone (re-measured apart from the others)
        api = start_api(service_dir, base_model_name, batched_port, work_dir / "serving-api.log", **device_settings)
        try:
            url = f"http://127.0.0.1:{batched_port}"
            for name, payload in (("generate", {"mode": "generate"}),
                                  ("score, full answers", {"mode": "score", "strategy": "full"}),
                                  ("score, trie", {"mode": "score", "strategy": "trie"})):
                run = EngineRun(name)
                _measure(run, _api_caller(url, {"model": model, "top_k": 1, **payload}), texts, warmup_text, progress)
                runs.append(run)
        finally:
            api.stop()
        api = start_api(service_dir, base_model_name, lock_port, work_dir / "serving-api-lock.log",
                        classify_max_batch_texts=1, **device_settings)
        try:
            run = EngineRun("score, trie, lock")
            _measure(run, _api_caller(f"http://127.0.0.1:{lock_port}", {"model": model, "top_k": 1, "strategy": "trie"}),
                     texts, warmup_text, progress)
            runs.append(run)
        finally:
            api.stop()

    # Work per request, from the tokenizer (the same renderings the scorer and generation use).
    tokenizer = load_tokenizer(base_model_dir)
    prompt = adapter.system_prompt
    cached = len(shared_prefix_ids(tokenizer, prompt))
    rendered = [render_prompt_ids(tokenizer, prompt, t, adapter.max_input_length) for t in texts]
    suffix = statistics.mean(len(ids) - cached for ids in rendered)
    from app.ml.infer.scoring import LabelCandidates

    candidates = LabelCandidates.build(tokenizer, prompt, label_set)
    trie_extra = len(candidates.shared_ids) + len(candidates.trie.nodes)
    full_extra = len(candidates.shared_ids) + sum(len(rest) for rest in candidates.remaining) - len(candidates.remaining)
    by_name = {r.name: r for r in runs}
    if vllm_only:
        by_name = {name: EngineRun(name) for name in ("score, trie", "score, trie, lock", "score, full answers",
                                                       "generate")}  # placeholders, not reported
    by_name["score, trie"].tokens_per_request = suffix + trie_extra
    by_name["score, trie"].tokens_note = f"{suffix:.0f} dialogue suffix + {trie_extra} (shared answer tokens + trie nodes)"
    by_name["score, trie, lock"].tokens_per_request = suffix + trie_extra
    by_name["score, full answers"].tokens_per_request = suffix + full_extra
    by_name["score, full answers"].tokens_note = f"{suffix:.0f} suffix + {full_extra} packed answer tokens"
    full_prompt = statistics.mean(len(ids) for ids in rendered)
    generated = by_name["generate"].raw_outputs
    if generated:  # the answer's tokens + the end-of-turn token
        new_tokens = statistics.mean(len(tokenizer(out or "", add_special_tokens=False).input_ids) + 1
                                     for out in generated)
        by_name["generate"].tokens_per_request = full_prompt + new_tokens
        by_name["generate"].tokens_note = (f"{full_prompt:.0f} prompt (incl. {cached} system prefix) + "
                                           f"{new_tokens:.1f} generated, one decode step each")

    # vLLM: one server for both rows; the adapter under a fresh name.
    vllm_note = None
    if vllm_skipped_by:
        vllm_note = f"skipped ({vllm_skipped_by})"
    elif not VLLM_PYTHON.exists():
        vllm_note = "not measured: no .venv-vllm (make test-vllm builds it)"
    else:
        import httpx

        vllm_port, api_port = _free_port(), _free_port()
        progress("[serving] starting the vLLM server (a minute or more)")
        try:
            vllm = start_vllm(base_model_dir, vllm_port, work_dir / "serving-vllm.log")
        except Exception as exc:
            vllm_note = f"not measured: the vLLM server did not start ({exc})"[:400]
        else:
            try:
                vllm_url = f"http://127.0.0.1:{vllm_port}"
                lora_name = f"bench-{int(time.time())}"
                loaded = httpx.post(f"{vllm_url}/v1/load_lora_adapter", timeout=120,
                                    json={"lora_name": lora_name, "lora_path": str(Path(adapter.adapter_dir).resolve())})
                loaded.raise_for_status()
                answers = [format_answer(lab.id, lab.name) for lab in label_set]
                client = httpx.Client(base_url=vllm_url, timeout=600)

                def choice_call(text: str):
                    body = {"model": lora_name, "temperature": 0, "max_tokens": 48,
                            "messages": [{"role": "system", "content": prompt}, {"role": "user", "content": text}],
                            "structured_outputs": {"choice": answers}}
                    response = client.post("/v1/chat/completions", json=body)
                    response.raise_for_status()
                    out = response.json()["choices"][0]["message"]["content"] or ""
                    return parse_answer(out.strip(), label_set).label_id, out

                for name, caller in (("vLLM guided choice", lambda: choice_call), ("vLLM via the API (trie)", None)):
                    run = EngineRun(name)
                    server = None
                    if caller is None:
                        server = start_api(service_dir, base_model_name, api_port, work_dir / "serving-api-vllm.log",
                                           inference_backend="vllm", vllm_url=vllm_url,
                                           # a CPU server shared with other work can take minutes per request
                                           vllm_timeout_seconds=900)
                        call = _api_caller(f"http://127.0.0.1:{api_port}", {"model": model, "top_k": 1})
                    else:
                        call = caller()
                    try:
                        call(warmup_text)
                        before = _vllm_counters(vllm_url)
                        requests_before = before.get("vllm:request_success", 0)
                        level, results = _drive(call, texts, 1)
                        after = _vllm_counters(vllm_url)
                        run.tokens_per_request = _vllm_tokens_per_request(vllm_url, before, after, len(texts))
                        n_requests = after.get("vllm:request_success", 0) - requests_before
                        run.tokens_note = (f"computed by vLLM (prompt - prefix-cache hits + generated), "
                                           f"{n_requests / len(texts):.0f} engine request(s) per dialogue")
                        run.levels[1], run.labels = level, [r[0] for r in results]
                        run.unparseable = sum(1 for r in results if r[0] is None)
                        for clients in CONCURRENCY[1:]:
                            run.levels[clients], _ = _drive(call, texts, clients)
                        progress(f"[serving] {name}: p50 {run.p(1, 50):.0f} ms at 1 client")
                    except Exception as exc:
                        run.error = f"{type(exc).__name__}: {exc}"[:300]
                        progress(f"[serving] {name}: not measured: {run.error}")
                    finally:
                        if server is not None:
                            server.stop()
                    runs.append(run)
            finally:
                vllm.stop()

    return _render(runs, texts, suffix, vllm_note, adapter, label_set, plot_path, time.perf_counter() - began)


def _doc_paragraphs() -> list[str]:
    """This module's docstring after its first line, as markdown paragraphs (a bullet list stays one block)."""
    out = []
    for block in (__doc__ or "").split("\n\n")[1:]:
        lines, merged = block.strip().splitlines(), []
        for line in lines:
            if line.startswith("- ") or not merged:
                merged.append(line.strip())
            else:
                merged[-1] += " " + line.strip()
        out.append("\n".join(merged))
    return out


def _render(runs: list[EngineRun], texts: list[str], suffix: float, vllm_note: str | None,
            adapter: AdapterUnderTest, label_set: LabelSet, plot_path: Path, seconds: float) -> SectionResult:
    reference = next((r for r in runs if r.name == "score, trie" and r.labels), None)
    full = next((r for r in runs if r.name == "score, full answers" and r.labels), None)

    def agreement(run: EngineRun, other: EngineRun | None) -> str:
        if other is None or not run.labels:
            return ""
        same = sum(1 for a, b in zip(run.labels, other.labels) if a == b)
        return f"{same}/{len(texts)}"

    def ms(value):
        return f"{value:.0f}" if value is not None else "–"

    def rate(value):
        return f"{value:.2f}" if value is not None else "–"

    rows = []
    for run in runs:
        if run.error:
            rows.append([run.name, f"not measured: {run.error}", "", "", "", "", "", "", "", ""])
            continue
        rows.append([run.name, ms(run.p(1, 50)), ms(run.p(1, 95)),
                     *[rate(run.levels[c].texts_per_s if c in run.levels else None) for c in CONCURRENCY],
                     f"{run.tokens_per_request:.0f}" if run.tokens_per_request is not None else "–",
                     f"{run.unparseable}/{len(run.labels)}", agreement(run, reference), agreement(run, full)])
    headers = ["engine / strategy", "p50 ms (1 client)", "p95 ms (1 client)",
               *[f"texts/s, {c} client{'s' if c > 1 else ''}" for c in CONCURRENCY],
               "tokens run / request", "unparseable", "same label as trie", "same label as full answers"]
    table = Table(headers, rows)

    by_name = {r.name: r for r in runs if not r.error}
    targets = []
    gen, trie, lock = by_name.get("generate"), by_name.get("score, trie"), by_name.get("score, trie, lock")
    if gen and trie:
        speedup = ratio(gen.p(1, 50), trie.p(1, 50))
        targets.append(["trie p50 vs full-prompt generation p50 (target >= 10x)", f"{speedup:.1f}x",
                        "met" if speedup and speedup >= 10 else "not met"])
        targets.append(["trie unparseable (target 0)", f"{trie.unparseable}", "met" if trie.unparseable == 0 else "not met"])
    if trie and trie.tokens_per_request:
        work = trie.tokens_per_request / suffix
        targets.append(["trie tokens per request / dialogue suffix (target <= 1.1x)", f"{work:.3f}x",
                        "met" if work <= 1.1 else "not met"])
    if trie and lock:
        for clients in CONCURRENCY:
            r = ratio(trie.levels[clients].texts_per_s, lock.levels[clients].texts_per_s)
            targets.append([f"micro-batcher vs lock, texts/s at {clients} client{'s' if clients > 1 else ''} "
                            "(target >= 1x; > 1x where batching pays)", f"{r:.2f}x" if r else "–",
                            "met" if r and r >= 0.95 else "not met"])
    target_table = Table(["target", "measured", ""], targets, caption="Targets (from the serving issue)")

    notes = []
    for run in runs:
        if run.tokens_note:
            notes.append(f"- {run.name}: {run.tokens_note}.")
    if vllm_note:
        notes.append(f"- vLLM rows: {vllm_note}.")
    notes.append("Each row sends the same dialogues, one per request; `texts/s, N clients` is dialogues answered "
                 "per second of wall time with N client threads. Latencies are client-side over HTTP. The "
                 "micro-batcher's 'met' allows 5% for run-to-run noise on shared cores. CPU only: on a GPU a "
                 "prefill of hundreds of tokens costs about one decode step, so the ratios differ there.")

    fig, axes = new_figure(2, width_per_panel=6.0)
    measured = [r for r in runs if not r.error]
    bar_group(axes[0], [r.name.replace(", ", "\n") for r in measured], {"p50 ms": [r.p(1, 50) for r in measured]},
              ylabel="ms (log)", title="p50 latency, 1 client", value_format="{:.0f}")
    axes[0].set_yscale("log")
    axes[0].tick_params(axis="x", labelsize=7)
    bar_group(axes[1], [f"{c} clients" for c in CONCURRENCY],
              {r.name: [r.levels[c].texts_per_s if c in r.levels else None for c in CONCURRENCY] for r in measured},
              ylabel="texts/s", title="throughput by concurrency", value_format="{:.2f}")
    axes[1].legend(fontsize=6)
    plot = save_figure(fig, plot_path)

    intro = [
        f"Model: {adapter.description}, on {adapter.base_model}. {len(texts)} dialogues (held-out rows when "
        f"the CMCC-34 data is present), {len(label_set)} labels, one dialogue per request, top_k 1; each row "
        "got one warm-up request first (model / adapter load, prefix cache), not counted.",
        *_doc_paragraphs(),
    ]
    return SectionResult(key="classify", title="3. Serving: generation, full-answer and trie scoring, "
                         "micro-batching, vLLM", intro=intro, tables=[table, target_table], plot=plot,
                         notes=notes, seconds=seconds,
                         data={"runs": [{"name": r.name, "error": r.error, "labels": r.labels,
                                         "tokens_per_request": r.tokens_per_request, "unparseable": r.unparseable,
                                         "levels": {c: {"latencies_ms": l.latencies_ms, "wall_s": l.wall_s}
                                                    for c, l in r.levels.items()}} for r in runs]})
