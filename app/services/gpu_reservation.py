"""A worker's own GPUs: with WORKER_GPUS=n a worker takes n of the GPUs it sees for its lifetime, each held by
an exclusive lock named by the GPU's UUID under DATA_DIR/.gpu-locks. Replicas of one compose service that all
see every GPU of a host (``docker compose up --scale worker=N``: compose gives every replica the same
reservation) so end up on different GPUs. UUIDs are unique across hosts, so DATA_DIR may be shared by many.
The locks are released by the kernel when the worker exits or is killed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from filelock import FileLock, Timeout

LOCKS_DIRNAME = ".gpu-locks"


def list_gpus() -> list[str]:
    """UUIDs of the GPUs this process sees (nvidia-smi: no CUDA context is made), [] without any."""
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def reserve_gpus(data_dir: Path, count: int, gpus: list[str]) -> tuple[list[str], list[FileLock]]:
    """Lock ``count`` of ``gpus`` (UUIDs) that no other worker holds; returns them and their held locks."""
    folder = Path(data_dir) / LOCKS_DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    taken: list[str] = []
    locks: list[FileLock] = []
    for uuid in gpus:
        lock = FileLock(str(folder / f"{uuid}.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            continue
        taken.append(uuid)
        locks.append(lock)
        if len(taken) == count:
            return taken, locks
    for lock in locks:
        lock.release()
    raise RuntimeError(f"WORKER_GPUS={count}, but only {len(taken)} of the {len(gpus)} GPUs this worker sees are "
                       f"free (the others are held by workers whose locks are in {folder})")
