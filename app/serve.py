"""`make serve`: the API (uvicorn, PORT) and one worker process sharing DATA_DIR's database."""

from __future__ import annotations

import os
import subprocess
import sys

import uvicorn

from app.core.config import get_settings
from app.core.db import run_migrations


def main() -> int:
    settings = get_settings()
    run_migrations(settings)  # once, before either process starts
    worker = subprocess.Popen([sys.executable, "-m", "workers"], env=os.environ.copy())
    try:
        uvicorn.run("app.main:create_app", factory=True, host=os.environ.get("HOST", "127.0.0.1"),
                    port=int(os.environ.get("PORT", "8000")))
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
