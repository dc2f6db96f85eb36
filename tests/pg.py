"""A throw-away PostgreSQL server for tests: ``initdb`` into a temporary directory, ``pg_ctl start`` on a free
127.0.0.1 port (unix sockets in that directory too), one fresh database per test, stopped and deleted after.

The binaries are Debian's (``/usr/lib/postgresql/<version>/bin``, ``apt-get install postgresql``) or those
in ``PG_BIN``. ``initdb`` refuses to run as root: as root the cluster belongs to the ``postgres`` system
user (the package creates it) and every server command runs through ``runuser -u postgres``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from itertools import count
from pathlib import Path

SERVER_USER = "postgres"


def find_pg_bin() -> Path | None:
    """The newest PostgreSQL bin directory with initdb and pg_ctl (``PG_BIN`` first), or None."""
    explicit = os.environ.get("PG_BIN")
    if explicit:
        candidates = [Path(explicit)]
    else:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.root: Path | None = None
        self.port: int | None = None
        self._names = count(1)
        self._as_server_user: list[str] = []

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _run(self, *args: str, timeout: float = 120) -> None:
        subprocess.run([*self._as_server_user, *args], check=True, timeout=timeout, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)

    def start(self) -> PostgresCluster:
        self.root = Path(tempfile.mkdtemp(prefix="intent-tuner-pg-"))
        if os.geteuid() == 0:
            try:
                server_user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise RuntimeError(f"running as root, initdb needs the '{SERVER_USER}' system user "
                                   "(apt-get install postgresql creates it)") from None
            os.chown(self.root, server_user.pw_uid, server_user.pw_gid)
            self._as_server_user = ["runuser", "-u", SERVER_USER, "--"]
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-locale", "--no-sync")
        last_error = None
        for _ in range(3):  # the free port may be taken by someone else before the server binds it
            self.port = _free_port()
            options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=400 "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            try:
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.root / "server.log"),
                          "-o", options, "-w", "-t", "60", "start")
                return self
            except subprocess.CalledProcessError as exc:
                last_error = exc
        log = (self.root / "server.log").read_text(errors="replace") if (self.root / "server.log").exists() else ""
        self.stop()
        raise RuntimeError(f"PostgreSQL did not start: {last_error}\n{log[-2000:]}")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{next(self._names)}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.root is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            try:
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop",
                          timeout=60)
            except subprocess.SubprocessError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None


def start_cluster() -> PostgresCluster:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries not found (initdb, pg_ctl): `make test-scale` installs "
                           "them (apt-get install postgresql), or set PG_BIN to their directory")
    return PostgresCluster(bin_dir).start()
