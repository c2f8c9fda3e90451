"""Stopping an asyncio loop on SIGINT or SIGTERM, reliably.

Dagster stops a step by raising an exception from its signal handler wherever the main thread
is. Inside asyncio that can land in a callback or a transport write, where asyncio catches it
and the loop goes on: the images stage kept downloading after a SIGTERM. Here the signal only
cancels the loop's task; once its cleanup has run, the signal goes to the handler that was in
place, from plain code.
"""

from __future__ import annotations

import asyncio
import signal
import threading


def run_until_signal(coro):
    """asyncio.run that SIGINT or SIGTERM stop within a moment: the coroutine is cancelled (its
    cleanup runs), then the handler that was in place gets the signal (Dagster's raises its
    interrupt; without one, KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(coro)
    received: list[int] = []
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        task = loop.create_task(coro)

        def on_signal(signo, _frame) -> None:
            received.append(signo)
            loop.call_soon_threadsafe(task.cancel)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            result = loop.run_until_complete(task)
        except asyncio.CancelledError:
            if not received:
                raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if not received:
        return result
    handler = previous[received[0]]
    if callable(handler):
        handler(received[0], None)
    raise KeyboardInterrupt
