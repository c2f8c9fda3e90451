"""great-expectations in a child process started ahead of the first gate.

Importing GX costs ~5 s of one core (scipy.stats, altair, pandas). A CLI run needs its first
gate seconds after it starts, and spends those seconds importing Dagster on one core while the
other waits: `started()` begins GX's import in a child on that other core, and while it runs
`quality.validate` sends each shard's audit frame there instead of importing GX here. A child
that died costs nothing but the head start: validation falls back to this process.

Protocol: 8-byte little-endian length + pickle of (stage, shard, frame, expectations) on stdin;
8-byte length + pickle of ("ok", Report) or ("error", exception) on stdout. EOF ends the child.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import struct
import subprocess
import sys
import threading

log = logging.getLogger(__name__)

WORKER_CMD = "from laion_assets.core.lake.gate_process import worker_main; worker_main()"

_current: GateProcess | None = None


class GateProcess:
    def __init__(self):
        # its own session: a Ctrl-C in the terminal reaches the CLI, which ends the child by EOF
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_CMD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )
        self.lock = threading.Lock()

    def validate(self, stage: str, shard: str, df, expectations):
        """The Report, or None when the child is gone (the caller validates itself)."""
        request = pickle.dumps((stage, shard, df, expectations), protocol=5)
        with self.lock:
            try:
                self.proc.stdin.write(struct.pack("<Q", len(request)))
                self.proc.stdin.write(request)
                self.proc.stdin.flush()
                head = self.proc.stdout.read(8)
                if len(head) < 8:
                    raise EOFError
                kind, value = pickle.loads(self.proc.stdout.read(struct.unpack("<Q", head)[0]))
            except (OSError, EOFError, pickle.UnpicklingError):
                log.warning("the great-expectations process ended (exit %s); validating in this process", self.proc.poll())
                return None
        if kind == "error":
            raise value
        return value

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def current() -> GateProcess | None:
    return _current


@contextlib.contextmanager
def started():
    """A gate process for the gates this process runs meanwhile (nested: the outer one)."""
    global _current
    if _current is not None:
        yield _current
        return
    _current = GateProcess()
    try:
        yield _current
    finally:
        gate, _current = _current, None
        gate.stop()


def worker_main() -> None:
    import os

    from laion_assets.core.lake import quality

    inp, out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    quality.context()  # the import and the context, before the first request arrives
    while True:
        head = inp.read(8)
        if len(head) < 8:
            out.close()
            os._exit(0)  # nothing left to write: skip the interpreter's teardown (~1.5 s with GX loaded)
        stage, shard, df, expectations = pickle.loads(inp.read(struct.unpack("<Q", head)[0]))
        try:
            reply = ("ok", quality.validate_here(stage, shard, df, expectations))
        except Exception as e:  # noqa: BLE001 - handed to the caller, which raises it
            try:
                pickle.loads(pickle.dumps(e))  # both ways: an exception whose __init__ takes other args fails on load
            except Exception:  # noqa: BLE001
                e = RuntimeError(f"great-expectations: {type(e).__name__}: {e}")
            reply = ("error", e)
        data = pickle.dumps(reply, protocol=5)
        try:
            out.write(struct.pack("<Q", len(data)))
            out.write(data)
            out.flush()
        except BrokenPipeError:  # the CLI is gone (killed): no one to answer
            os._exit(0)
