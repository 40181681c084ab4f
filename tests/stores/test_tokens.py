"""Lease tokens of the shared stores (``oncely.stores._key_batch.new_token``)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from oncely.stores._key_batch import new_token


def test_tokens_do_not_repeat_in_a_process() -> None:
    tokens = [new_token() for _ in range(10_000)]
    assert len(set(tokens)) == len(tokens)


def test_threads_of_a_process_never_share_a_token() -> None:
    # Several event loops in threads of one process (or aiosqlite's) draw from one counter.
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: [new_token() for _ in range(5_000)], range(4)))
    tokens = [t for run in runs for t in run]
    assert len(set(tokens)) == len(tokens)


# Python 3.12+ warns about fork() in a process with threads (pytest's or a test's leftovers);
# the child here only writes to a pipe and exits.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_never_hands_out_its_parents_tokens() -> None:
    # A worker pool that forks after importing oncely must not give two processes the same
    # tokens: a begin that finds its own token on a key is NEW again (a re-sent call).
    new_token()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next tokens, to the parent
        try:
            os.write(write, " ".join(new_token() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [new_token() for _ in range(3)]
    assert len(child) == 3
    assert not set(child) & set(parent)
    assert child[0][:24] != parent[0][:24]
