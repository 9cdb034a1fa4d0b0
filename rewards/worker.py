"""A killable worker process for code that may hang or crash: the math verifier's checks and user
reward functions both run behind one.

Not a multiprocessing.Pool: a pool whose worker is killed while it holds the task queue's lock
deadlocks in terminate(); a lone process behind a pipe can always be killed and replaced. It is
started with forkserver: a small clean process, not a fork of a big multithreaded trainer.
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Callable


class WorkerError(Exception):
    """What the served handler raised, as one line."""


def one_line(e: BaseException, limit: int | None = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"[:limit]


def _serve(conn, make_handler: Callable, args: tuple) -> None:
    """The worker's loop: `make_handler(*args)` once (imports), then payload in, ("ok", result) or
    ("error", why) out. A handler that cannot be made answers every request with its error."""
    try:
        handle, failure = make_handler(*args), None
    except Exception as e:  # noqa: BLE001 - reported to the caller
        handle, failure = None, one_line(e)
    while True:
        try:
            payload = conn.recv()
        except EOFError:  # the trainer side closed the pipe
            return
        if failure is not None:
            conn.send(("error", failure))
            continue
        try:
            conn.send(("ok", handle(payload)))
        except Exception as e:  # noqa: BLE001 - reported to the caller
            conn.send(("error", one_line(e)))


class Worker:
    """One process serving `make_handler(*args)` (a module-level function, run in the child)."""

    def __init__(self, make_handler: Callable, *args):
        context = mp.get_context("forkserver")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, make_handler, args), daemon=True)
        self.process.start()
        child.close()

    def ask(self, payload, timeout: float | None):
        """The handler's result. Raises TimeoutError when none came in time, OSError / EOFError when
        the worker is gone, WorkerError for what the handler raised."""
        self.conn.send(payload)
        if not self.conn.poll(timeout):
            raise TimeoutError
        status, value = self.conn.recv()
        if status != "ok":
            raise WorkerError(value)
        return value

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()
