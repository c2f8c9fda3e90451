"""User-facing errors: one line saying what is wrong and how to fix it."""

from __future__ import annotations

import errno
import functools
import os
import re
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class LaionAssetsError(Exception):
    """Bad input or configuration. The message is shown to the user as-is, on one line."""


class ValidationFailed(LaionAssetsError):
    """A shard failed its data-quality gate and was not published.

    Carries the gate's report (each expectation with its threshold and observed value) and the
    stage's figures (status counts, top errors...), so the failure shows its cause."""

    def __init__(self, stage: str, shard: str, failures: list[str], report=None, stats: dict | None = None):
        self.stage, self.shard, self.failures = stage, shard, failures
        self.report, self.stats = report, stats or {}
        super().__init__(
            f"{stage} shard '{shard}' failed validation, not published: " + "; ".join(failures)
        )


class InfrastructureError(LaionAssetsError):
    """The machine or the store failed (disk full, permissions, missing or corrupt files, object
    store), not the data: one line naming the cause and the fix. `kind` says which."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class StagingUnusable(LaionAssetsError):
    """A shard's staged chunks in `table` cannot be read back or do not match their checksums:
    the staging is dropped and the shard recomputed."""

    def __init__(self, message: str, table: str):
        super().__init__(message)
        self.table = table


# kind: (pattern in the message, errnos, cause, fix); the first match wins. Rust errors
# (deltalake, object_store) arrive as strings ending in "(os error N)", Python's as OSError.errno.
_KNOWN = {
    "disk_full": (
        r"no space left on device|os error 28\)|disk quota exceeded|os error 122\)", (errno.ENOSPC, errno.EDQUOT),
        "no space left on device", "free disk space or put the lake on a larger volume (--lake), then rerun: finished chunks are kept",
    ),
    "permission": (
        r"permission denied|os error 13\)|operation not permitted|os error 1\)|read-only file system|os error 30\)",
        (errno.EACCES, errno.EPERM, errno.EROFS),
        "permission denied or read-only file system",
        "make the lake folder writable by this user (remount it read-write), or pass --lake with one you can write",
    ),
    "object_store": (
        r"accessdenied|access denied|access_denied|invalidaccesskeyid|signaturedoesnotmatch|expiredtoken|nosuchbucket|"
        r"generic s3 error|error sending request|connection refused|dns error|failed to lookup address", (),
        "object store error", "check the endpoint, bucket and credentials (AWS_* variables), then rerun",
    ),
    "corrupt": (
        r"magic bytes not found|couldn't deserialize thrift|corrupt|checksum|out of spec|unexpected end of file|"
        r"range\.end as u64 <= self\.size", (),
        "a data file is corrupt", "restore the file, or redo the shard with `laion-assets run --force`",
    ),
    "missing": (
        r"no such file or directory|os error 2\)|object at location .* not found|notfound", (errno.ENOENT,),
        "a file the lake lists is missing", "it was deleted outside laion-assets: restore it, or redo the shard with `laion-assets run --force`",
    ),
}


def explain(exc: BaseException) -> InfrastructureError | None:
    """The one-line InfrastructureError for a low-level failure, or None when it is not one."""
    if isinstance(exc, (LaionAssetsError, KeyboardInterrupt, SystemExit, GeneratorExit)):
        return None
    message = " ".join(re.sub(r"\x1b\[[0-9;]*m|↳", " ", str(exc)).split())  # Rust errors: colours, arrows
    code = getattr(exc, "errno", None)
    for kind, (pattern, errnos, cause, fix) in _KNOWN.items():
        if code in errnos or re.search(pattern, message, re.IGNORECASE):
            where = getattr(exc, "filename", None)
            detail = f"{where}: {os.strerror(code)}" if where and code else message[:200]
            return InfrastructureError(f"{cause} ({detail}): {fix}", kind)
    if isinstance(exc, MemoryError):
        return InfrastructureError("out of memory: lower download.max_pending_mb or embeddings.batch_size, or add memory", "memory")
    return None


def explained(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn infrastructure failures raised by `fn` into their one-line InfrastructureError
    (shown as-is in the CLI summary and the UI); everything else passes unchanged."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            err = explain(e)
            if err is None:
                raise
            raise err from e

    return wrapper
