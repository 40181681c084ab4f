"""The payload fingerprint is stored with every key: its value must never change."""

from __future__ import annotations

import hashlib
import threading

import pytest

from oncely.runtime.codec import fingerprint

# Digests of the algorithm as first shipped (blake2b, digest_size=16, hex): a key stored by an
# older worker must not read as reused with a different payload.
KNOWN = [
    (b"", "cae66941d9efbd404e4d88758ea67670"),
    (b"{}", "2afb9b83f9314e5d029766197f539792"),
    (b'{"n":1}', "984530e49acf879ea2a3b7c3062fca65"),
    (bytes(range(256)) * 3, "e0892860f9fc0da273b9db57e857c19a"),
]


@pytest.mark.parametrize(("body", "digest"), KNOWN)
def test_fingerprint_is_unchanged(body: bytes, digest: str) -> None:
    assert fingerprint(body) == digest
    assert fingerprint(body) == hashlib.blake2b(body, digest_size=16).hexdigest()


def test_fingerprints_do_not_leak_into_each_other() -> None:
    # The digest starts from a shared empty state each time: one body must not change the next.
    first = fingerprint(b'{"a":1}')
    fingerprint(b"x" * 10_000)
    assert fingerprint(b'{"a":1}') == first


def test_fingerprint_from_many_threads() -> None:
    bodies = [f'{{"n":{i}}}'.encode() * (i % 50 + 1) for i in range(200)]
    expected = [hashlib.blake2b(b, digest_size=16).hexdigest() for b in bodies]
    seen: list[list[str]] = []

    def work() -> None:
        seen.append([fingerprint(b) for b in bodies])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [expected] * 4
