"""A benchmark's servers started side by side: much of each start is waiting (Java's and torch's imports, a worker
loading its engine, readiness polls), so starting them at once saves part of the time they take one after
another (benchmarks/RESULTS.md, session 50)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterator, TypeVar

Server = TypeVar("Server")


@contextmanager
def running(server: Server, start: Callable[[], object]) -> Iterator[Server]:
    """``server`` while it runs: ``start()`` starts it (and waits until it is ready), ``server.stop()`` stops it at
    the end, and after a start that failed (what it started is not left behind)."""
    try:
        start()
        yield server
    finally:
        server.stop()


@contextmanager
def side_by_side(*contexts: AbstractContextManager) -> Iterator[list]:
    """Enters ``contexts`` each on a thread of its own and yields their values in order; at the end exits them
    side by side too (without the exception: each only stops what it started). When one fails to enter, those
    that did are exited and its error is raised. An interrupt (Ctrl-C; SIGTERM as exit_on_sigterm's SystemExit)
    while they start waits for the starts under way (each bounded by its own start timeout), so that what they
    started is stopped, not left running; after a second interrupt during that wait, a start still under way stops
    what it started itself as it ends (its thread keeps the interpreter until then)."""
    outcomes: list[tuple[bool, object] | None] = [None] * len(contexts)  # (entered, its value or its error)
    # Set by each start's thread as it begins and as it ends. Not Thread.join(): interrupted, it marks the thread as
    # stopped though it runs on (CPython 3.11), and a second join returns at once.
    began = [threading.Event() for _ in contexts]
    ended = [threading.Event() for _ in contexts]
    abandoned = False  # no longer waited for: a start that ends now exits its context itself
    lock = threading.Lock()

    def enter(index: int) -> None:
        began[index].set()
        try:
            value = contexts[index].__enter__()
        except BaseException as err:
            outcomes[index] = (False, err)
        else:
            with lock:
                left_behind = abandoned
                if not left_behind:
                    outcomes[index] = (True, value)
            if left_behind:
                contexts[index].__exit__(None, None, None)
        finally:
            ended[index].set()

    try:
        try:
            for index in range(len(contexts)):
                threading.Thread(target=enter, args=(index,), name=f"start-{index}").start()
            # Where an interrupt lands; the wait in `finally` then runs whole (without one it finds every event set).
            for done in ended:
                done.wait()
        finally:  # after an interrupt too: the starts under way end first, then what they started is stopped
            for index in range(len(contexts)):
                if began[index].wait(1.0):  # (a thread whose start() was interrupted runs at once, or never)
                    ended[index].wait()
        failed = [value for entered, value in filter(None, outcomes) if not entered]
        if failed:
            raise failed[0]
        yield [value for _, value in outcomes]
    finally:
        with lock:
            abandoned = True
            entered = [context for context, outcome in zip(contexts, outcomes) if outcome is not None and outcome[0]]
        _exit_all(entered)


def _exit_all(contexts: list[AbstractContextManager]) -> None:
    if not contexts:
        return
    with ThreadPoolExecutor(len(contexts), thread_name_prefix="stop") as pool:
        stops = [pool.submit(context.__exit__, None, None, None) for context in contexts]
    errors = [stop.exception() for stop in stops if stop.exception() is not None]
    if errors:
        raise errors[0]
