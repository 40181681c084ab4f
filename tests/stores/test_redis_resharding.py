"""The Redis store on a Redis Cluster whose slots move while it runs (resharding).

A private three-node cluster of this test's own (the shared one is never resharded): one key's
slot is migrated to another node by hand, as ``redis-cli --cluster reshard`` does it. While the
slot is migrating, a key still on the old node is served there and a key not on it is served by
the new node after an ``ASK`` redirect; once the slot has moved, every call gets ``MOVED`` and
follows it. Each transition keeps its meaning throughout: one ``NEW`` per key, the token fences
``complete``, and a completed key stays completed with its result.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from redis.asyncio import Redis
from redis.crc import key_slot

from oncely.errors import LeaseLost
from oncely.stores.base import Begin, Outcome
from oncely.stores.redis import RedisStore

LONG = 30.0


def _cluster_ports(count: int) -> list[int]:
    """Ports whose cluster bus port (port + 10000) is free too."""
    ports: list[int] = []
    for port in range(21000, 29000, 7):
        if len(ports) == count:
            break
        with contextlib.ExitStack() as stack:
            try:
                for candidate in (port, port + 10000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        ports.append(port)
    assert len(ports) == count, "no free ports for a private Redis Cluster"
    return ports


async def _run(*args: str) -> str:
    result = await anyio.run_process(list(args), check=False)
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{out}"
    return out


@contextlib.asynccontextmanager
async def private_cluster(directory: Path) -> AsyncIterator[list[Redis]]:
    """Three primaries on free loopback ports, joined; yields a plain client per node."""
    server = shutil.which("redis-server")
    assert server, "redis-server is not installed (run scripts/services.sh up)"
    ports = _cluster_ports(3)
    processes: list[Process] = []
    clients = [Redis(host="127.0.0.1", port=p, socket_timeout=5) for p in ports]
    try:
        for port in ports:
            data = directory / str(port)
            data.mkdir(parents=True)
            args = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
            args += ["--save", "", "--appendonly", "no", "--cluster-enabled", "yes"]
            args += ["--cluster-config-file", "nodes.conf", "--logfile", str(data / "log")]
            processes.append(await anyio.open_process(args))
        await _until(lambda: _all(clients, _pings), "the nodes to answer")
        nodes = [f"127.0.0.1:{p}" for p in ports]
        await _run("redis-cli", "--cluster", "create", *nodes, "--cluster-yes")
        await _until(lambda: _all(clients, _cluster_ok), "cluster_state:ok on every node")
        yield clients
    finally:
        for client in clients:
            await client.aclose()
        for process in processes:
            process.kill()
            await process.wait()
            await process.aclose()


async def _cmd(client: Redis, *args: object) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


async def _pings(client: Redis) -> bool:
    try:
        return bool(await client.ping())
    except Exception:
        return False


async def _cluster_ok(client: Redis) -> bool:
    info = await _cmd(client, "CLUSTER", "INFO")
    return b"cluster_state:ok" in info


async def _all(clients: list[Redis], check: object) -> bool:
    for client in clients:
        if not await check(client):  # type: ignore[operator]
            return False
    return True


async def _until(check: object, what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"no {what} within {within}s"
        await anyio.sleep(0.05)


async def _node_id(client: Redis) -> str:
    node_id: bytes = await _cmd(client, "CLUSTER", "MYID")
    return node_id.decode()


async def _owner(clients: list[Redis], slot: int) -> int:
    for i, client in enumerate(clients):
        if slot in await _own_slots(client):
            return i
    raise AssertionError(f"no node owns slot {slot}")


async def _own_slots(client: Redis) -> set[int]:
    me = await _node_id(client)
    owned: set[int] = set()
    for line in (await _cmd(client, "CLUSTER", "NODES")).decode().splitlines():
        fields = line.split()
        if fields[0] != me:
            continue
        for part in fields[8:]:
            if part.startswith("["):
                continue
            low, _, high = part.partition("-")
            owned.update(range(int(low), int(high or low) + 1))
    return owned


async def _held_by(client: Redis, key: str | bytes) -> bool:
    """Whether ``client``'s node holds ``key`` (ASKING: an importing slot's keys count)."""
    pipe = client.pipeline(transaction=False)
    pipe.execute_command("ASKING")
    pipe.exists(key)
    _, found = await pipe.execute()
    return bool(found)


def _same_slot_key(store: RedisStore, slot: int, avoid: str) -> str:
    for n in range(1_000_000):
        candidate = f"other-{n}"
        if candidate != avoid and key_slot(store.redis_key(candidate).encode()) == slot:
            return candidate
    raise AssertionError("no second key found for the slot")


@pytest.mark.anyio
async def test_transitions_keep_their_meaning_while_a_slot_moves(
    tmp_path: Path, unique: str, anyio_backend: object
) -> None:
    async with private_cluster(tmp_path) as clients:
        url = ",".join(f"127.0.0.1:{c.connection_pool.connection_kwargs['port']}" for c in clients)
        async with (
            RedisStore(f"redis://{url}/0?cluster=1&prefix={unique}:") as store,
            RedisStore(f"redis://{url}/0?cluster=1&prefix={unique}:") as other,
        ):
            first = await store.begin("moving", "fp", LONG)
            assert first.outcome is Outcome.NEW and first.token
            redis_key = store.redis_key("moving").encode()
            slot = key_slot(redis_key)
            second_key = _same_slot_key(store, slot, "moving")
            src = await _owner(clients, slot)
            dst = (src + 1) % 3
            source, target = clients[src], clients[dst]
            src_id, dst_id = await _node_id(source), await _node_id(target)

            # Migration begins; "moving" is still on the source node.
            await _cmd(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            await _cmd(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            assert (await other.begin("moving", "fp", LONG)).outcome is Outcome.IN_PROGRESS
            # Not on the source: ASK, then the script runs on the target.
            second = await store.begin(second_key, "fp", LONG)
            assert second.outcome is Outcome.NEW and second.token
            assert await _held_by(target, store.redis_key(second_key))
            assert (await other.begin(second_key, "fp", LONG)).outcome is Outcome.IN_PROGRESS

            # "moving" moves to the target too; calls on it now follow ASK.
            port = target.connection_pool.connection_kwargs["port"]
            await _cmd(source, "MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", redis_key)
            assert await _held_by(target, redis_key)
            assert (await other.begin("moving", "fp", LONG)).outcome is Outcome.IN_PROGRESS
            assert (await other.begin("moving", "other-fp", LONG)).outcome is Outcome.MISMATCH
            await store.complete("moving", first.token, b"moved", LONG)
            with pytest.raises(LeaseLost):
                await other.complete("moving", "stale-token", b"no", LONG)

            # The slot is the target's now: MOVED, and the clients follow it.
            for client in clients:
                await _cmd(client, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            assert await _owner(clients, slot) == dst
            assert await other.begin("moving", "fp", LONG) == Begin(
                Outcome.COMPLETED, result=b"moved"
            )
            await store.renew(second_key, second.token, LONG)
            with pytest.raises(LeaseLost):
                await other.renew(second_key, "stale-token", LONG)
            await store.complete(second_key, second.token, None, LONG)
            assert await other.begin(second_key, "fp", LONG) == Begin(Outcome.COMPLETED)
            assert await target.exists(redis_key, store.redis_key(second_key)) == 2
