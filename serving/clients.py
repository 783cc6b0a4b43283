"""Whose share a request counts in: the client behind a peer address, for the per-client shares of the
adapter (adapter/limits.py, adapter/protocol.py) and of KServe's model server's gRPC bound
(handler/held_bodies.py). A trusted proxy's X-Forwarded-For names the client by uvicorn's rule (the
nearest address in it that is not itself a trusted proxy), the adapter's through uvicorn's middleware. And the rule
of those shares while clients compete (max-min fairness): fair_share, giving_way."""
from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TypeVar

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

T = TypeVar("T")

# The client key of the request this task answers, on KServe's model server (set by its REST checks and its gRPC
# bound): whose line its work waits in further down (serving/fair_pool.py). "" where nobody set it.
CALLER: ContextVar[str] = ContextVar("caller", default="")

# An IPv6 client is its /64: one subscriber or host usually holds a whole /64 (2^64 addresses), so a
# share per address would be a share per source address it cares to pick.
IPV6_CLIENT_PREFIX = 64


@functools.lru_cache(maxsize=4096)  # per request: a few microseconds each, the same few hosts again and again
def client_key(host: str) -> str:
    """The client a peer address counts as: an IPv4 address (also written IPv4-mapped, ::ffff:a.b.c.d)
    itself, an IPv6 address its /64; anything else (a Unix socket's name) as it is."""
    try:
        address = ipaddress.ip_address(host.split("%")[0])  # fe80::1%eth0: the zone is not the client
    except ValueError:
        return host
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/{IPV6_CLIENT_PREFIX}", strict=False))
    return str(address)


def proxy_networks(proxies: Iterable[str]) -> list[str]:
    """Trusted proxies as networks ("10.0.0.1/8" -> "10.0.0.0/8", "10.0.0.1" -> "10.0.0.1/32"): uvicorn reads
    X-Forwarded-For only from entries it can parse strictly, and took one with host bits set for a literal that
    matched nothing. ValueError naming an entry that is no address or network."""
    networks = []
    for proxy in (proxy.strip() for proxy in proxies):
        try:
            networks.append(str(ipaddress.ip_network(proxy, strict=False)))
        except ValueError:
            raise ValueError(f"{proxy!r} is not an IP address or network") from None
    return networks


@functools.lru_cache(maxsize=4096)  # per call: a connection's peer, for its every call
def grpc_peer_host(peer: str) -> str:
    """The host of grpc's peer string: "ipv4:10.0.0.7:51234" -> "10.0.0.7", "ipv6:[::1]:51234" -> "::1", and an
    IPv4 client of a dual-stack listener ("ipv6:[::ffff:10.0.0.7]:51234") as its IPv4 address, so that it matches
    IPv4 proxies; another kind ("unix:/run/sock") as it is."""
    kind, _, address = peer.partition(":")
    if kind == "ipv4":
        return address.rpartition(":")[0]
    if kind != "ipv6":
        return peer
    return unmapped_host(address.rpartition(":")[0].strip("[]").replace("%25", "%"))


def unmapped_host(host: str) -> str:
    """An IPv4 client of a dual-stack listener (IPv4-mapped, "::ffff:10.0.0.7") as its IPv4 address, so that it
    matches IPv4 proxies; any other host as it is."""
    try:
        mapped = ipaddress.IPv6Address(host.split("%")[0]).ipv4_mapped
    except ValueError:
        return host
    return str(mapped) if mapped is not None else host


class ForwardedClient:
    """The client key of a request from ``host`` that carries ``X-Forwarded-For`` values: ``host`` itself unless
    it is among ``trusted_networks`` (proxy_networks), then the client the header names (client_key of either).
    Without trusted proxies the header is ignored: any client could name a new address each time."""

    def __init__(self, trusted_networks: list[str]):
        self._proxies = ProxyHeadersMiddleware(_forwarded_to, trusted_networks) if trusted_networks else None

    @property
    def reads_headers(self) -> bool:
        """Whether ``key`` needs the request's X-Forwarded-For (a trusted proxy may send it)."""
        return self._proxies is not None

    async def key(self, host: str, forwarded_for: list[str]) -> str:
        if self._proxies is not None and forwarded_for:
            scope = {"type": "http", "client": (host, 0),
                     "headers": [(b"x-forwarded-for", value.encode("latin-1", "replace")) for value in forwarded_for]}
            await self._proxies(scope, None, None)
            host = scope["client"][0]
        return client_key(host)


async def _forwarded_to(scope, receive, send) -> None:
    """ProxyHeadersMiddleware's application: the client it found is left in the scope."""


def fair_share(places: int, clients: int, most: int) -> int:
    """What each of ``clients`` may keep of ``places`` while they all want more: an equal part (one at least), and
    never more than ``most``, a client's share however few compete (max-min fairness: two clients at half each
    would leave a third nothing)."""
    return min(most, max(1, places // max(1, clients)))


def giving_way(holders: Mapping[str, Iterable[T]], past: Callable[[str], float]) -> Iterator[T]:
    """What gives way to a newcomer within its fair share, in turn: the newest thing of the client most past its own
    share, then the next; ``holders``: what each client could give, oldest first; ``past(client)``: the times its
    fair share it holds (over 1: past it), asked again before each (a caller taking off what was chosen changes
    it). The one rule of every bound's max-min fairness: the adapter's uploads, the predictor's bodies and turns."""
    left = {client: list(things) for client, things in holders.items()}
    while left := {client: things for client, things in left.items() if things}:
        crowding = max(left, key=past)  # (the first of equals: the oldest holder)
        if past(crowding) <= 1:
            return
        yield left[crowding].pop()


class StoppableWait:
    """The current task's wait, which a newcomer within its fair share may end (giving_way): ``stop()`` cancels the
    task; in its ``except asyncio.CancelledError``, ``gave_way()`` says whether that cancel was the stop's alone (one
    of another kind too, a deadline's or a client's that left, goes on as it came). The adapter's requests waiting
    for a connection to the model server, the predictor's explanations waiting for the explainer's thread."""

    def __init__(self):
        self.task = asyncio.current_task()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        self.task.cancel()

    def gave_way(self) -> bool:
        return self.stopped and self.task.uncancel() == 0


def newest_past_fair_share(waiting: Sequence[tuple[object, str | None]], client: str, places: int,
                           most: int) -> tuple[object, int] | None:
    """When all ``places`` are taken and ``client`` would wait too: of ``waiting`` (entries and their clients, oldest
    first), the newest entry of the client that waits in the most, if that is past its fair share (fair_share among
    the clients waiting and ``client``) and ``client`` is under it, with that share; else None."""
    by_client: dict[str, list] = {}
    for entry, owner in waiting:
        if owner is not None:
            by_client.setdefault(owner, []).append(entry)
    share = fair_share(places, len(by_client.keys() | {client}), most)
    if len(by_client.get(client, ())) >= share:
        return None
    entry = next(giving_way(by_client, lambda owner: len(by_client[owner]) / share), None)
    return None if entry is None else (entry, share)


def removed(by_client: dict[str, dict], client: str, item) -> bool:
    """``item`` taken out of ``by_client[client]`` (a client's things, in a dict for their order), the client gone
    with its last one; False (nothing changed) when it was not there."""
    items = by_client.get(client)
    if not items or item not in items:
        return False
    del items[item]
    if not items:
        del by_client[client]
    return True
