"""A training run in a child process of the worker: one process, or one per GPU under torchrun (DDP).

The worker (``run_training_process``) writes what to train to ``DATA_DIR/jobs/<id>/launch/<run>/spec.json``
and starts

- ``python -m app.services.training_process rank SPEC``: one training process (no GPU, or one GPU), or
- ``python -m app.services.training_process launch --nproc-per-node N SPEC``: torchrun's elastic agent
  (``torch.distributed.run``, standalone rendezvous on localhost) starting N ``rank`` processes, one per GPU
  (NCCL) or N CPU processes (gloo) when the job asks for ``resources.processes``.

It keeps heartbeating in its own thread (a child never decides liveness), relays a cancel request, its
own shutdown or the loss of the job to another worker as a ``stop`` file that every rank reads after each
step (the ranks agree on it, app.ml.train.trainer), and ends the job from what the child left: rank 0's
``outcome.json``, a rank's ``error-rank<r>.json`` (bad input, out of memory, a Python error), the agent's
``failures.json`` (which rank died of which signal), or else the exit status. A child that crashes,
segfaults or is killed fails its job with a message naming the exit code or signal; the worker lives on.

Rank 0 writes progress and events to the database (only while the job is still this worker's),
checkpoints and the adapter (app.ml.train.trainer). Every child dies with its parent (Linux
PR_SET_PDEATHSIG, else a watchdog), so a worker killed with -9 leaves no training behind; and rank 0 holds
an exclusive lock on the job's folder while it trains, so the run that resumes the job waits until a
late one is gone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from app.core.config import Settings
from app.domain.artifacts import LAUNCH_DIRNAME, TRAINING_LOCK_FILENAME
from app.domain.resources import JobResources

log = logging.getLogger("intent_tuner.training")

PARENT_PID_ENV = "INTENT_TUNER_PARENT_PID"
SPEC_FILENAME = "spec.json"
STOP_FILENAME = "stop"
OUTCOME_FILENAME = "outcome.json"
FAILURES_FILENAME = "failures.json"
LOCK_WAIT_SECONDS = 120.0  # a training process left by a dead worker dies within a second (PDEATHSIG)


class TrainingProcessError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ProcessPlan:
    """How a training runs here: ``processes`` ranks, on ``gpus`` (CUDA ids, one per rank) or on the CPU."""

    processes: int
    gpus: tuple[str, ...] = ()

    @property
    def backend(self) -> str:
        return "nccl" if self.gpus else "gloo"

    def describe(self) -> str:
        where = f"GPU{'s' if len(self.gpus) > 1 else ''} {','.join(self.gpus)}" if self.gpus else "the CPU"
        how = f"{self.processes} processes under torchrun (DDP, {self.backend})" if self.processes > 1 \
            else "1 process"
        return f"{how} on {where}"


def visible_gpus(device: str | None) -> list[str]:
    """The CUDA devices this worker may give its jobs, as CUDA_VISIBLE_DEVICES names them."""
    if device and not device.startswith("cuda"):
        return []
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    names = listed[:count] if len(listed) >= count else [str(i) for i in range(count)]
    if device and ":" in device:  # DEVICE=cuda:N: this one GPU
        index = int(device.split(":", 1)[1])
        return [names[index]] if index < len(names) else []
    return names


def plan_processes(resources: dict | None, gpus: list[str]) -> ProcessPlan:
    """The plan for a job's ``resources`` on a worker that sees ``gpus``; refuses what it cannot give."""
    wanted = JobResources(**(resources or {}))
    if gpus:
        count = wanted.gpus or wanted.processes or len(gpus)
        if count > len(gpus):
            raise TrainingProcessError("insufficient_gpus", f"the job asks for {count} GPUs; this worker sees "
                                       f"{len(gpus)} (route it with resources.labels to a worker that has them)")
        return ProcessPlan(count, tuple(gpus[:count]))
    if wanted.gpus:
        raise TrainingProcessError("insufficient_gpus", f"the job asks for {wanted.gpus} GPUs; this worker has none "
                                   "(route it with resources.labels to a GPU worker)")
    return ProcessPlan(wanted.processes or 1)


# --- the worker's side -------------------------------------------------------------------------------


def _child_env(settings: Settings, plan: ProcessPlan) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())}
    env.pop("DATABASE_URL", None)
    if settings.database_url:  # in the environment, not in the spec on the shared volume: it may hold a password
        env["DATABASE_URL"] = settings.database_url
    if plan.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(plan.gpus)
    return env


def _command(plan: ProcessPlan, spec_path: Path) -> list[str]:
    module = [sys.executable, "-m", "app.services.training_process"]
    if plan.processes == 1:
        return [*module, "rank", str(spec_path)]
    return [*module, "launch", "--nproc-per-node", str(plan.processes), str(spec_path)]


def run_training_process(settings: Settings, *, job_id: str, worker_id: str, plan: ProcessPlan, spec: dict,
                         should_stop: Callable[[], bool], poll_seconds: float = 0.5):
    """Train in a child process (or a torchrun group) and wait for it; returns the ``TrainingResult`` (one
    that says ``cancelled`` when it stopped on ``should_stop``) or raises ``TrainingProcessError``."""
    from app.ml.train.trainer import TrainingResult, finished_training

    job_dir = settings.jobs_dir / job_id
    run_dir = job_dir / LAUNCH_DIRNAME / f"{worker_id.rsplit(':', 1)[-1]}-{time.time_ns()}"
    run_dir.mkdir(parents=True)
    spec_path = run_dir / SPEC_FILENAME
    spec = {**spec, "job_id": job_id, "worker_id": worker_id, "job_dir": str(job_dir.resolve()),
            "device": "cuda" if plan.gpus else "cpu",
            "settings": settings.model_dump(mode="json", exclude={"api_key", "database_url"})
            | {"data_dir": str(settings.data_dir.resolve())}}
    spec_path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    process = subprocess.Popen(_command(plan, spec_path), env=_child_env(settings, plan), start_new_session=True)
    log.info("job %s: training in %s (pid %s)", job_id, plan.describe(), process.pid)
    stopping = False
    try:
        while True:
            try:
                code = process.wait(timeout=poll_seconds)
                break
            except subprocess.TimeoutExpired:
                if not stopping and should_stop():
                    (run_dir / STOP_FILENAME).touch()  # the ranks stop after their current step
                    stopping = True
    finally:
        if process.poll() is None:  # only when this thread itself was interrupted: leave nothing running
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:
        outcome = _read_json(run_dir / OUTCOME_FILENAME)
        if code == 0 and outcome is not None:
            if outcome["cancelled"]:
                return TrainingResult(None, True, outcome["steps"], None, 0.0, "none")
            result = finished_training(job_dir)
            if result is None:
                raise TrainingProcessError("training_crashed", "the training process ended without writing the adapter")
            return result
        raise _failure(run_dir, code, plan)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exit_description(code: int) -> str:
    if code < 0:
        name = _signal_name(-code)
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"was killed by {name} (exit code {code}){hint}"
    return f"exited with code {code}"


def _failure(run_dir: Path, code: int, plan: ProcessPlan) -> TrainingProcessError:
    """Why the child ended badly. Under torchrun one rank's death takes the others down (a broken collective,
    or torchrun's SIGTERM), so the cause is looked for in this order: a rank that died without a word (a
    signal, an abrupt exit), a rank's own report of a specific error, any rank's report, the exit status."""
    reports = {}
    for path in run_dir.glob("error-rank*.json"):
        report = _read_json(path)
        if report:
            reports[int(path.stem.removeprefix("error-rank"))] = report
    failures = _read_json(run_dir / FAILURES_FILENAME) or []
    silent = [f for f in failures if f["rank"] not in reports and f["exitcode"] != -signal.SIGTERM]
    if silent:
        first, others = silent[0], sorted({f["rank"] for f in failures} - {silent[0]["rank"]})
        message = (f"training process rank {first['rank']} of {plan.processes} (pid {first['pid']}) "
                   f"{_exit_description(first['exitcode'])}")
        if others:
            message += f"; rank {', '.join(map(str, others))} ended with it"
        return TrainingProcessError("training_process_died", message)
    for rank in sorted(reports, key=lambda r: (reports[r]["code"] == "training_crashed", r)):
        return TrainingProcessError(reports[rank]["code"], reports[rank]["message"])
    if failures:
        first = failures[0]
        return TrainingProcessError("training_process_died", f"training process rank {first['rank']} of "
                                    f"{plan.processes} (pid {first['pid']}) {_exit_description(first['exitcode'])}")
    return TrainingProcessError("training_process_died", f"the training process {_exit_description(code)}")


# --- the child's side --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Exit when the process that started this one dies (a worker killed with -9 leaves no training behind)."""
    expected = int(os.environ.get(PARENT_PID_ENV, "0"))
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
        watchdog = False
    except (OSError, AttributeError):
        watchdog = True
    if expected and os.getppid() != expected:  # it died before the line above
        os._exit(1)
    if watchdog and expected:
        def watch() -> None:
            while os.getppid() == expected:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def _write_error(run_dir: Path, rank: int, code: str, message: str) -> None:
    (run_dir / f"error-rank{rank}.json").write_text(json.dumps({"code": code, "message": message},
                                                                ensure_ascii=False), encoding="utf-8")


def _rank_hooks(settings: Settings, spec: dict, rank: int, stop_file: Path):
    from app.core.db import session_scope
    from app.ml.train.trainer import TrainingHooks
    from app.services import queue
    from app.services.jobs import add_event

    job_id, worker_id = spec["job_id"], spec["worker_id"]
    should_stop = stop_file.exists
    if rank != 0:
        return TrainingHooks(should_stop=should_stop)

    def on_log(metrics: dict) -> None:
        with session_scope(settings) as session:
            queue.record_training_log(session, job_id, metrics, worker_id=worker_id)

    def on_event(kind: str, message: str, data: dict | None = None) -> None:
        with session_scope(settings) as session:
            add_event(session, job_id, kind, message, data)
        log.info("[%s] %s: %s", job_id, kind, message)

    def on_progress(progress: dict) -> None:
        with session_scope(settings) as session:
            queue.set_progress(session, job_id, progress, worker_id=worker_id)

    return TrainingHooks(on_log=on_log, on_event=on_event, should_stop=should_stop, on_progress=on_progress)


def _train_rank(spec: dict, run_dir: Path, rank: int, local_rank: int, world: int):
    import torch
    from filelock import FileLock, Timeout

    from app.domain.labels import LabelSet
    from app.ml.train.config import TrainingConfig
    from app.ml.train.trainer import train_adapter
    from app.services import datasets as dataset_service

    settings = Settings(**spec["settings"])
    device = spec["device"]
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    job_dir = Path(spec["job_dir"])
    lock = FileLock(str(job_dir / TRAINING_LOCK_FILENAME), timeout=LOCK_WAIT_SECONDS) if rank == 0 else nullcontext()
    try:
        with lock:
            return train_adapter(
                base_model_dir=Path(spec["base_model_dir"]), base_model_name=spec["base_model"],
                records=dataset_service.load_records(settings, spec["dataset_id"]),
                label_set=LabelSet.from_pairs(spec["label_set"]), system_prompt=spec["system_prompt"],
                config=TrainingConfig(**spec["hyperparameters"]), job_dir=job_dir,
                hooks=_rank_hooks(settings, spec, rank, run_dir / STOP_FILENAME), device=device,
                validation_records=(dataset_service.load_records(settings, spec["validation_dataset_id"])
                                    if spec.get("validation_dataset_id") else None))
    except Timeout:
        raise TrainingProcessError("training_busy", f"another training process of this job still held "
                                   f"{job_dir / TRAINING_LOCK_FILENAME} after {LOCK_WAIT_SECONDS:.0f} s") from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def rank_main(spec_path: Path) -> int:
    """One training process (rank ``RANK`` of ``WORLD_SIZE`` under torchrun, else the only one)."""
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    run_dir = spec_path.parent
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        result = _train_rank(spec, run_dir, rank, local_rank, world)
    except TrainingProcessError as exc:
        _write_error(run_dir, rank, exc.code, str(exc))
        return 1
    except ValueError as exc:  # the trainer's own checks: data or recipe that cannot be trained as asked
        _write_error(run_dir, rank, "invalid_training_input", str(exc))
        return 1
    except (MemoryError, torch.OutOfMemoryError) as exc:
        _write_error(run_dir, rank, "out_of_memory",
                     f"{exc}; lower per_device_train_batch_size or max_input_length")
        return 1
    except Exception as exc:  # noqa: BLE001 - reported to the worker, which fails the job with it
        log.exception("training crashed")
        _write_error(run_dir, rank, "training_crashed", f"{type(exc).__name__}: {exc}")
        return 1
    if rank == 0:
        (run_dir / OUTCOME_FILENAME).write_text(json.dumps({"cancelled": result.cancelled, "steps": result.steps}),
                                                encoding="utf-8")
    return 0


def launch_main(nproc: int, spec_path: Path) -> int:
    """torchrun (torch.distributed.run, standalone) starting ``nproc`` ranks; records which ones failed."""
    _die_with_parent()
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ[PARENT_PID_ENV] = str(os.getpid())  # the ranks die with this agent
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module",
                       "app.services.training_process", "rank", str(spec_path)])
    try:
        run(args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
        (spec_path.parent / FAILURES_FILENAME).write_text(json.dumps(
            [{"rank": rank, "pid": failure.pid, "exitcode": failure.exitcode} for rank, failure in failures]),
            encoding="utf-8")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m app.services.training_process",
                                     description="A worker's training process (started by the worker).")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("rank").add_argument("spec", type=Path)
    launch = commands.add_parser("launch")
    launch.add_argument("--nproc-per-node", type=int, required=True)
    launch.add_argument("spec", type=Path)
    args = parser.parse_args(argv)
    if args.command == "rank":
        return rank_main(args.spec)
    return launch_main(args.nproc_per_node, args.spec)


if __name__ == "__main__":
    sys.exit(main())
