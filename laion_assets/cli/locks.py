"""Several `laion-assets run` at once on one lake and one instance take turns where they must.

File locks beside the instance (in DAGSTER_HOME, which every process of a local instance
shares): one serializes creating or migrating the instance and registering shards (two
processes creating a fresh sqlite instance at once left it with two alembic heads); one per
lake and shard lets a single process compute a shard while another that was given it too
does its other shards first, then waits and finds the shard up to date. A lock dies with its
process (kill -9 included), so nothing is left to clean up. Runs on several machines share
no DAGSTER_HOME: they need Postgres and the daemon (`laion-assets backfill`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

NAP_S = 0.2  # how soon a waiting run notices the lock is free (and Ctrl-C: SIGTERM raises)


class FileLock:
    """An exclusive flock on `path`, holding the owner's pid for the waiting line."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return True

    def owner(self) -> str:
        return os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"

    def acquire(self, waiting: str | None = None) -> None:
        """Take the lock, printing `waiting` (with the owner's pid) once if it is held."""
        if self.try_acquire():
            return
        if waiting:
            print(f"{waiting} (pid {self.owner()}): waiting", flush=True)
        while not self.try_acquire():
            time.sleep(NAP_S)

    def release(self) -> None:
        os.close(self.fd)  # closing drops the flock


@contextlib.contextmanager
def instance_lock(home: str | Path) -> Iterator[None]:
    """Held while this process creates, migrates or writes registrations into the instance."""
    lock = FileLock(Path(home) / ".laion-assets.lock")
    lock.acquire("another laion-assets command is setting up this Dagster instance")
    with held(lock):
        yield


@contextlib.contextmanager
def held(lock: FileLock) -> Iterator[FileLock]:
    """Release an acquired lock when the block ends, however it ends."""
    try:
        yield lock
    finally:
        lock.release()


def shard_lock(home: str | Path, lake_uri: str, shard: str) -> FileLock:
    """The lock a process holds while it runs `shard` of the lake at `lake_uri` (not yet taken)."""
    name = hashlib.sha256(f"{lake_uri}\0{shard}".encode()).hexdigest()[:24]
    return FileLock(Path(home) / ".laion-assets-locks" / f"{name}.lock")
