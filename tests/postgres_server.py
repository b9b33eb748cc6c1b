"""A throwaway PostgreSQL server for the tests: Debian's binaries, a cluster in a temporary folder, loopback only.

``initdb`` refuses to run as root, so as root (CI) the cluster folder belongs to ``nobody`` and the server runs as
that user. Password authentication over TCP (so a wrong password is refused as on a real site), trust on the
unix socket in the cluster folder. Durability switched off: a test cluster trades it for speed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "qc"
PASSWORD = "qc-test-secret"


def find_bindir() -> Path | None:
    """The folder holding initdb/pg_ctl: ``pg_config --bindir`` if it has them, else the newest Debian one."""
    candidates = []
    if shutil.which("pg_config"):
        done = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(done.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    for folder in candidates:
        if folder and all(Path(folder, tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="qc-postgres-"))  # not under pytest's root-only tmp folder
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = free_port()
        self._as = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.folder, nobody.pw_uid, nobody.pw_gid)
            self._as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        password_file = self.folder / "password"
        password_file.write_text(PASSWORD + "\n")
        if self._as:
            os.chown(password_file, self._as["user"], self._as["group"])
        self._run("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={password_file}", "-E", "UTF8",
                  "--auth-host=scram-sha-256", "--auth-local=trust", "--no-sync")
        password_file.unlink()

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([str(self.bindir / tool), *args], capture_output=True, text=True, cwd=self.folder,
                              timeout=120, check=False, **self._as)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {done.stdout}{done.stderr}\n{log}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")

    def running(self) -> bool:
        done = subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"], capture_output=True,
                              cwd=self.folder, timeout=60, check=False, **self._as)
        return done.returncode == 0

    def stop(self) -> None:
        """A fast shutdown: open connections are ended, as in a restart or failover."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres", password: str = PASSWORD, port: int | None = None) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{port or self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.folder, ignore_errors=True)
