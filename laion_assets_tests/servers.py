"""Real servers for the tests, each on 127.0.0.1 with a free port and its files in a temp folder:
PostgreSQL (initdb + postgres from the system packages), Redis, and a moto S3 server.

Tests use them through the session fixtures in conftest.py (`postgres`, `redis`) or start their
own (`MotoServer`). Nothing here talks to any address but 127.0.0.1 (and unix sockets).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, what: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            if check():
                return
        except Exception:  # not up yet: refused, or the database still starting
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or max(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), default=None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: run scripts/system-packages.sh")
    return found


class PostgresServer:
    """A throwaway PostgreSQL cluster: password auth on 127.0.0.1:<port> and a unix socket in
    its folder, durability off (fsync) for speed.

    PostgreSQL refuses to run as root; as root, the cluster belongs to `nobody`.
    """

    user = "laion"
    password = "laion-test-password"

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="laion-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._as = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        if self._as:
            os.chown(self.root, self._as.pw_uid, self._as.pw_gid)

    @property
    def socket_dir(self) -> str:
        return str(self.root)

    def _run(self, args: list[str], **kw) -> subprocess.Popen:
        if self._as:
            kw.update(user=self._as.pw_uid, group=self._as.pw_gid, extra_groups=[])
        return subprocess.Popen(args, cwd=self.root, **kw)

    def start(self) -> PostgresServer:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self._as:
            os.chown(pwfile, self._as.pw_uid, self._as.pw_gid)
        init = self._run(
            [_pg_bin("initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
             "--auth=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        out = init.communicate(timeout=120)[0]
        if init.returncode:
            raise RuntimeError(f"initdb failed: {out.decode(errors='replace')[-2000:]}")
        pwfile.unlink()
        self.log = open(self.root / "postgres.log", "wb")
        self.proc = self._run(
            [_pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=300", "-c", "shared_buffers=64MB"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for(self._accepts, "postgres", proc=self.proc)
        return self

    def _accepts(self) -> bool:
        import psycopg2

        psycopg2.connect(**self.connect_args("postgres")).close()
        return True

    def connect_args(self, db: str) -> dict:
        return dict(host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=db)

    def create_database(self, name: str) -> str:
        """A fresh, empty database (dropped first if it exists); returns its name."""
        import psycopg2

        conn = psycopg2.connect(**self.connect_args("postgres"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return name

    def env(self, db: str) -> dict[str, str]:
        """The variables deploy/postgres/dagster.yaml reads its credentials from."""
        return {
            "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USER": self.user, "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": db,
        }

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # smart shutdown; fast with fsync off
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """redis-server on 127.0.0.1:<port> and a unix socket, nothing persisted."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="laion-redis-"))
        os.chmod(self.root, 0o755)
        self.port = free_port()
        self.socket = str(self.root / "redis.sock")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_url(self) -> str:
        return f"redis+socket://{self.socket}?virtual_host=0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--unixsocket", self.socket,
             "--unixsocketperm", "777", "--save", "", "--appendonly", "no", "--dir", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.port), 1).close() is None, "redis", proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


class MotoServer:
    """moto's S3 server in its own process (a server thread in the test process deadlocks
    deltalake, whose requests hold the GIL).

    moto 5.2.5 honours `If-None-Match: *` on PutObject, but checks and stores without a lock in
    its threaded server: two simultaneous creates of one key can both succeed, which S3 never
    allows. So requests are served one at a time (connections still on threads), and each
    conditional write to a `_delta_log/` is recorded (`commits()`).
    """

    def __init__(self, honour_conditional_writes: bool = True):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.journal = Path(tempfile.mkdtemp(prefix="laion-moto-")) / "log-puts.jsonl"
        self.honour = honour_conditional_writes  # False: a store that ignores If-None-Match
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "laion_assets_tests.servers", "moto", str(self.port), str(self.journal), str(int(self.honour))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: urllib.request.urlopen(self.endpoint, timeout=1) is not None, "moto server", proc=self.proc)
        return self

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true",
        }

    def commits(self) -> list[dict]:
        """Every PUT to a `_delta_log/` key: key, If-None-Match header, HTTP status."""
        import json

        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines()]

    def stop(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.journal.parent, ignore_errors=True)


def _serve_moto(port: int, journal: str, honour: bool) -> None:
    import json
    import threading

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()
    out = open(journal, "a", buffering=1)

    def serial(environ, start_response):
        path = environ.get("PATH_INFO", "")
        log_put = environ["REQUEST_METHOD"] == "PUT" and "/_delta_log/" in path
        status = []

        def recording_start(code, headers, *exc):
            status.append(code)
            return start_response(code, headers, *exc)

        if not honour:
            environ.pop("HTTP_IF_NONE_MATCH", None)
        with lock:
            body = b"".join(app(environ, recording_start))
            if log_put:
                out.write(json.dumps({"key": path, "if_none_match": environ.get("HTTP_IF_NONE_MATCH"), "status": status[0][:3]}) + "\n")
        return [body]

    run_simple("127.0.0.1", port, serial, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    if sys.argv[1] == "moto":
        _serve_moto(int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1")
