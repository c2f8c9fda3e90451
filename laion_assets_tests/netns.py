"""Workers as separate hosts: Linux network namespaces (`ip netns`) holding only a loopback.

A namespace shares the filesystem with the test machine, not the network. A worker "host"
reaches the database and the broker through a small forwarder running in its namespace: it
listens on the namespace's 127.0.0.1:<port> and pipes each connection to the server's unix
socket (the wire between the hosts), so the worker uses the same addresses as everyone else.
The image server (faultsite's routes over the test's site folder) runs in each namespace:
every host reaches "the web" on its own. Nothing leaves 127.0.0.1.

    python -m laion_assets_tests.netns --forward 5432=/path/.s.PGSQL.5432 --site DIR --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path


def unavailable() -> str | None:
    """Why namespaces cannot be used here (None when they can)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        return "network namespaces need root and iproute2"
    probe = f"laion-probe-{uuid.uuid4().hex[:6]}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode:
        return "`ip netns add` is not permitted here (no CAP_SYS_ADMIN)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Host:
    """A network namespace with its loopback up; processes started in it with `start`."""

    def __init__(self, name: str):
        self.name = f"laion-{name}-{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *args], start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _forward(port: int, socket_path: str) -> None:
    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(socket_path)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forward", action="append", default=[], help="PORT=UNIX_SOCKET")
    parser.add_argument("--site", help="site folder to serve with faultsite's routes on 127.0.0.1:--port")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.site:
        from laion_assets_tests.faultsite import FaultServer

        FaultServer(Path(args.site), port=args.port)

    async def run():
        await asyncio.gather(*(_forward(int(p), s) for p, s in (f.split("=", 1) for f in args.forward)))

    asyncio.run(run())


if __name__ == "__main__":
    main()
