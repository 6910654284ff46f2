"""The governor on Redis: one API key's limits shared by every process and host using it.

Install the extra (``pip install "sora-async[redis]"``) and give every process the
same Redis::

    governor = sa.RedisGovernor("redis://cache:6379/0")   # or SORA_ASYNC_REDIS_URL
    async with sa.SoraClient(governor=governor) as client: ...

Each decision is one Lua script, atomic on Redis and timed by Redis's own clock
(``TIME``), so hosts whose clocks disagree still share one window. See the README's
"Many processes, one key" for the clock, lease and failure model.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import logging
import os
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import anyio
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._errors import InputError, RedisUnavailableError
from ._governor import (
    SLOT_REFUSAL_WINDOW,
    Backoff,
    CreatePause,
    RequestKind,
    RequestQueue,
    TaskNews,
)
from ._models import Limits, TaskStatus
from ._priority import PRIORITIES, Priority, check_rules, rank_of, served_as
from ._redis_scripts import ACQUIRE, ANNOUNCE, APPLY, RATE_INCREASE, READ, RENEW, REQUEST

__all__ = ["RedisGovernor"]

logger = logging.getLogger("sora_async")

_T = TypeVar("_T")
_MIN_WAIT = 1e-3
# Back-off between attempts to reach Redis grows to this many seconds at most.
_LONGEST_RECONNECT_PAUSE = 2.0
# How often a process checks that Redis still holds the key's data, and retries Redis
# at most, in parts of the re-registration round: it must have written its slots and
# grants back well within the round.
_ROUND_PARTS = 4


@dataclass
class _Slot:
    """A slot this process holds, as it knows it (the truth it re-registers after a loss)."""

    task_id: str = ""
    model: str = ""
    free_at: float | None = None  # loop time an uncertain hold ends
    # A create was granted a permit on it: its bytes may have left. Only such a slot is
    # held as uncertain when this process dies; the others are freed at once.
    sent: bool = False
    rank: int = 1  # the priority it was taken at


class _SlotLost(Exception):
    """The slot a create was to be sent on is no longer this process's."""


_status_encoder = msgspec.json.Encoder()
_status_decoder = msgspec.json.Decoder(TaskStatus)


class RedisGovernor:
    """Keep every process and host using one API key inside the key's limits, through Redis.

    Requests: a sliding log of grants on Redis's clock, so that no window of
    ``period + jitter_margin`` holds more than ``requests`` grants from all
    processes together; polls are paced, wait in one first-come-first-served line
    across processes, and may not take the last ``create_reserve`` places of a
    window, which stay for creates and callback confirmations. A 429 seen by any
    process pauses all of them and shrinks a shared rate factor (AIMD). Slots: a
    lease semaphore whose tickets are served by priority, then first come first
    served, across every process (``reserved``, ``lend_after`` and ``starve_after``
    as in :class:`LocalGovernor`; the reserve is the interactive side's setting,
    written to the key when it registers and with its interactive creates). Each slot records the
    task that holds it; when a process dies its tasks are adopted by a live
    process, polled to their end, and only then freed.
    When Redis cannot be reached nothing is sent: work waits up to ``redis_timeout``
    seconds, then raises :class:`RedisUnavailableError`. A Redis that holds nothing for
    the key (its first use, or a restart that lost the data) cannot tell what was sent
    in the last window or which tasks still run, so every process waits one
    ``reregister_round`` (1 s), in which each live process writes back its slots and
    the grants of its last window (it looks for the loss every quarter of a round);
    pass ``trust_empty_redis=True`` where nothing else can have used the key (tests).

    Key names carry a hash of the API key and the model, never the key itself.
    Raises :class:`InputError` for a bad URL, key or setting.

    Example::

        governor = sa.RedisGovernor("redis://localhost:6379/0")
        async with sa.SoraClient(governor=governor) as client: ...
    """

    adopts_orphans = True

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        model: str = "sora-2-pro",
        limits: Limits | None = None,
        jitter_margin: float = 1.0,
        create_reserve: int = 2,
        lease: float = 15.0,
        uncertain_hold: float = 600.0,
        redis_timeout: float = 120.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        probe_after: int = 10,
        trust_empty_redis: bool = False,
        reregister_round: float = 1.0,
        seed: int | None = None,
        reserved: int = 0,
        lend_after: float | None = 600.0,
        starve_after: float = 600.0,
    ) -> None:
        self.url, key = redis_url_and_key(url, api_key)
        self.limits = limits if limits is not None else Limits()
        self._rules = check_rules(reserved, lend_after, starve_after, self.limits.concurrent_tasks)
        if jitter_margin < 0:
            raise InputError("jitter_margin", "must be zero or more seconds")
        if not 0 <= create_reserve < self.limits.requests:
            raise InputError("create_reserve", "must be at least 0 and below limits.requests")
        if lease <= 0 or redis_timeout <= 0 or uncertain_hold < 0:
            raise InputError("lease", "lease and redis_timeout must be positive seconds")
        if reregister_round <= 0:
            raise InputError("reregister_round", "must be positive seconds")
        self.model = model
        # Who shares: a hash of the key and the model. The braces keep every key of one
        # budget in one Redis Cluster slot, as multi-key scripts need.
        identity = hashlib.sha256(f"{key}\0{model}".encode()).hexdigest()[:16]
        self.prefix = f"sora-async:{{{identity}}}"
        # The key's own records, whatever the model (its spend): a hash of the key alone.
        key_identity = hashlib.sha256(f"{key}\0key".encode()).hexdigest()[:16]
        self.key_prefix = f"sora-async:{{{key_identity}}}"
        self.owner = secrets.token_hex(8)  # this process's name in Redis
        self.lease = lease
        self.uncertain_hold = uncertain_hold
        self.redis_timeout = redis_timeout
        self.reregister_round = reregister_round
        # What for_model() hands on to the governors of other models' budgets.
        self._api_key = key
        self._settings: dict[str, Any] = {
            "jitter_margin": jitter_margin,
            "lease": lease,
            "uncertain_hold": uncertain_hold,
            "redis_timeout": redis_timeout,
            "backoff_base": backoff_base,
            "backoff_cap": backoff_cap,
            "probe_after": probe_after,
            "trust_empty_redis": trust_empty_redis,
            "reregister_round": reregister_round,
            "seed": seed,
            "lend_after": lend_after,
            "starve_after": starve_after,
        }
        self._window = self.limits.period + jitter_margin
        self._spacing = self._window / (self.limits.requests - 1)
        self._reserve = create_reserve
        self._backoff = Backoff(
            base=backoff_base,
            cap=backoff_cap,
            probe_after=probe_after,
            slots=self.limits.concurrent_tasks,
            seed=seed,
        )
        self._random = self._backoff.random
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._epoch = ""
        self._trust_empty = trust_empty_redis
        self._reregister = False  # Redis lost its data: write our slots back
        self._queue = RequestQueue()
        self._creates = CreatePause()
        self._members = itertools.count()
        self._waiting_by_rank = [0] * len(PRIORITIES)  # this process's slot waiters
        self._announced = False  # its reserve, written to the key once registered
        # The key's waiting creates and slots by priority, as refresh() last read them.
        self._key_waiting: dict[Priority, int] = dict.fromkeys(PRIORITIES, 0)
        self._key_slots: dict[Priority, int] = dict.fromkeys(PRIORITIES, 0)
        self._not_before = 0.0  # a 429 seen here pauses this process at once
        # The key's figures as last read from Redis.
        self._rate_factor = 1.0
        self._slot_limit = self.limits.concurrent_tasks
        self._slots_in_use = 0
        self._in_window = 0
        self._rate_limited_seen = 0
        self._slot_waiters = 0
        # Slots: what this process holds, and what it must still tell Redis.
        self._mine: dict[str, _Slot] = {}
        self._slots_owed = 0  # slots of our creates lost while our lease had lapsed
        self._outbox: list[str] = []
        self._outbox_ready = asyncio.Event()
        self._registered = asyncio.Event()
        self._slots_freed = asyncio.Event()
        self._renewed_at: float | None = None
        self._watched_at: float | None = None
        # This process's grants of the last window, (Redis time in ms, member): written
        # back if Redis loses them, so the window stays whole across a restart.
        self._grants: collections.deque[tuple[float, str]] = collections.deque()
        self.round_trips = 0  # scripts run, for the benchmark's round trips per request

    def for_model(self, model: str, limits: Limits) -> RedisGovernor:
        """Return a RedisGovernor for ``model``'s own budget on the same Redis and key:
        its own ``limits``, this one's settings (lease, timeouts, jitter margin,
        back-off; the create reserve at most ``limits.requests - 1``).

        Example::

            veo = governor.for_model("veo-3-1", sa.MODELS["veo-3-1"].limits)
        """
        return RedisGovernor(
            self.url,
            api_key=self._api_key,
            model=model,
            limits=limits,
            create_reserve=min(self._reserve, limits.requests - 1),
            reserved=min(self._rules[0], limits.concurrent_tasks - 1),
            **self._settings,
        )

    def __repr__(self) -> str:
        return f"RedisGovernor(prefix={self.prefix!r}, owner={self.owner!r})"

    # --- Redis access -------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    @property
    def _channel(self) -> str:
        return self._key("news")

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = aioredis.from_url(
                self.url,
                decode_responses=True,
                socket_connect_timeout=2.0,
                socket_timeout=5.0,
                health_check_interval=10,
            )
            for name, lua in (
                ("request", REQUEST),
                ("acquire", ACQUIRE),
                ("apply", APPLY),
                ("renew", RENEW),
                ("read", READ),
                ("announce", ANNOUNCE),
            ):
                self._scripts[name] = self._redis.register_script(lua)
        return self._redis

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run one script, waiting out a Redis outage up to ``redis_timeout``."""
        return await self._patiently(lambda: self._scripts[name](keys=keys, args=args))

    async def _patiently(self, call: Callable[[], Awaitable[_T]]) -> _T:
        self._client()
        result = await patiently(
            call,
            url=self.url,
            timeout=self.redis_timeout,
            rng=self._random,
            longest_pause=self._longest_pause,
        )
        self.round_trips += 1
        return result

    def _reconnect_pause(self, attempt: int) -> float:
        """Return how long to wait before trying Redis again (backed off, jittered)."""
        return reconnect_pause(attempt, self._random, self._longest_pause)

    @property
    def _longest_pause(self) -> float:
        # After Redis comes back empty, everyone waits one round for live processes to
        # write their slots and grants back: each must retry Redis well within it.
        return min(_LONGEST_RECONNECT_PAUSE, self.reregister_round / _ROUND_PARTS)

    async def refresh(self) -> None:
        """Read the key's figures from Redis now, taking nothing and writing nothing.

        The figures (slots, window use, rate factor, 429s, waiting creates) are
        otherwise as last read while requesting; an operator's view calls this to
        watch a key without using it. Raises :class:`RedisUnavailableError`.
        """
        in_window, used, waiting, factor, slot_limit, limited, by_rank, slots = await self._script(
            "read",
            [
                self._key("grants"),
                self._key("slots"),
                self._key("tickets"),
                self._key("factor"),
                self._key("slot_limit"),
                self._key("limited"),
            ],
            [self.limits.period * 1000, self.limits.concurrent_tasks],
        )
        self._in_window = int(in_window)
        self._slots_in_use = int(used)
        self._slot_waiters = int(waiting)
        self._rate_factor = float(factor)
        self._slot_limit = int(slot_limit)
        self._rate_limited_seen = int(limited)
        self._key_waiting = dict(zip(PRIORITIES, map(int, by_rank), strict=True))
        self._key_slots = dict(zip(PRIORITIES, map(int, slots), strict=True))

    # --- request budget -----------------------------------------------------------------

    @property
    def rate_factor(self) -> float:
        """Return the key's share of the nominal rate in force (1.0 unless 429s were seen)."""
        return self._rate_factor

    def requests_in_window(self) -> int:
        """Return how many requests all processes were granted in the last window, as last read."""
        return self._in_window

    @property
    def rate_limited_seen(self) -> int:
        """Return how many 429s all processes reported on the key, as last read."""
        return self._rate_limited_seen

    @property
    def slot_waiters(self) -> int:
        """Return how many creates of all processes waited for a slot, as last read."""
        return self._slot_waiters

    async def request(self, kind: RequestKind, priority: Priority = "normal") -> None:
        """Wait until one request of ``kind`` may be sent by this process, and spend it
        (a create's ``priority`` orders it among this process's creates waiting)."""
        if kind == "create":
            await self._creates.wait()
            while self._slots_owed:
                # A create's slot was freed while our lease had lapsed: take another.
                self._slots_owed -= 1
                await self.acquire_slot(priority)
        # A poll keeps one place in the key's poll line across its attempts.
        ticket = f"{self.owner}:p{next(self._members)}" if kind == "status" else ""
        try:
            while True:
                try:
                    await self._queue.serve(
                        kind, lambda kind: self._try_send(kind, ticket), rank_of(priority)
                    )
                    return
                except _SlotLost:
                    await self.acquire_slot(priority)
        except BaseException:
            if ticket:
                # Cancelled (a caller's deadline): give its place in the key's line back
                # now, not when it would have lapsed, which stalls every poll behind it.
                self._send("unline", ticket)
            raise

    async def _try_send(self, kind: RequestKind, ticket: str) -> float:
        now = asyncio.get_running_loop().time()
        if self._not_before > now:
            return self._not_before - now
        paced = kind == "status"
        member = f"{self.owner}:{next(self._members)}"
        # The slot a granted create marks as sent, in the same atomic step. Attempts are
        # made one at a time (by the head of the line), so no two pick the same slot.
        sending = self._unbound(sent=False) if kind == "create" else None
        if kind == "create" and self._slots_owed:
            # A renewal found a slot of our creates freed while our lease had lapsed,
            # after this create passed the check in request(): it takes a slot first,
            # or it would go out on none and the service would refuse it.
            self._slots_owed -= 1
            raise _SlotLost
        granted, wait_ms, epoch, factor, in_window, redis_now = await self._script(
            "request",
            [
                self._key("grants"),
                self._key("pause"),
                self._key("factor"),
                self._key("last_poll"),
                self._key("epoch"),
                self._key("recover"),
                self._key("poll_line"),
                self._key("poll_due"),
                self._key("poll_seq"),
                self._key("slots"),
            ],
            [
                self._known_epoch,
                self.owner,
                member,
                self._window * 1000,
                self.limits.requests,
                self._reserve,
                1 if paced else 0,
                self._spacing * 1000,
                self.reregister_round * 1000,
                ticket,
                sending or "",
            ],
        )
        self._note_epoch(epoch)
        self._rate_factor = float(factor)
        self._in_window = int(in_window)
        if int(granted) == -1:
            assert sending is not None
            logger.warning("a create's slot was freed while this process's lease had lapsed")
            del self._mine[sending]
            raise _SlotLost
        if int(granted):
            self._remember_grant(float(redis_now), member)
            if sending is not None and sending in self._mine:
                self._mine[sending].sent = True
            return 0.0
        wait = max(float(wait_ms) / 1000, _MIN_WAIT)
        if paced:
            return wait  # the poll line already orders the processes: a late poll is waste
        # Jitter: processes woken by one event must not all arrive in the same instant.
        return wait + self._random.uniform(0, min(0.05, wait / 10))

    def _remember_grant(self, at_ms: float, member: str) -> None:
        grants = self._grants
        grants.append((at_ms, member))
        while grants and grants[0][0] <= at_ms - self._window * 1000:
            grants.popleft()

    def rate_limited(self, kind: RequestKind, retry_after: float | None) -> None:
        """Pause every process and shrink the key's rate (and slots, for a create).

        A create refused while the key's window (as the grant of this create read it)
        is under half full is taken for tasks we do not know holding slots: the key's
        slot limit shrinks to the slots held, this process's creates pause, and the
        shared rate factor and pause are left alone.
        """
        now = asyncio.get_running_loop().time()
        limit = max(1, int(self.limits.requests * self._rate_factor))
        if kind == "create" and self._in_window < limit * SLOT_REFUSAL_WINDOW:
            self._rate_limited_seen += 1
            self._send("slots_full")
            if self._creates.stale:
                return
            pause = self._backoff.slot_refused(retry_after)
            self._creates.refused(now + pause, wakeable=retry_after is None)
            logger.warning("429 on a create with the window far from full: slots, not rate")
            return
        pause = self._backoff.pause(kind, retry_after)
        self._not_before = max(self._not_before, now + pause)
        self._rate_limited_seen += 1  # counted on the key when the report is carried
        self._send("limited", "", f"{pause * 1000:.3f}", kind)
        logger.warning("429 on %s: pausing every process %.1f s", kind, pause)

    def request_took(self, seconds: float) -> None:
        """Nothing to learn: grants are stamped on Redis's clock, from hosts whose paths to
        Redis and to the service differ, so the margin stays ``jitter_margin``."""

    def request_succeeded(self, kind: RequestKind) -> None:
        """Count a success; after enough of them, raise the key's rate and slots one step."""
        rate_up, slots_up = self._backoff.succeeded(
            kind,
            rate_cut=self._rate_factor < 1.0,
            slots_cut=self._slot_limit < self.limits.concurrent_tasks,
            probe=self._creates.probing,
        )
        if rate_up:
            self._rate_factor = min(1.0, self._rate_factor + RATE_INCREASE)
            self._send("probe")
        if slots_up:
            self._slot_limit = min(self.limits.concurrent_tasks, self._slot_limit + 1)
            self._send("slot_probe")
        if kind == "create":
            self._creates.went_through(self._backoff)

    # --- task slots ---------------------------------------------------------------------

    @property
    def slots_in_use(self) -> int:
        """Return how many of the key's slots all processes hold, as last read."""
        return self._slots_in_use

    @property
    def slot_limit(self) -> int:
        """Return how many slots the key may hold now (shrinks after 429s on creates)."""
        return self._slot_limit

    @property
    def slots_held_here(self) -> int:
        """Return how many slots this process holds."""
        return len(self._mine)

    def slot_waiters_by_priority(self) -> dict[Priority, int]:
        """Return how many creates of this process wait for a task slot, by priority."""
        return dict(zip(PRIORITIES, self._waiting_by_rank, strict=True))

    def slots_by_priority(self) -> dict[Priority, int]:
        """Return how many task slots this process holds, by the priority they were
        taken at (``key_by_priority`` gives every process's, as ``refresh`` read it)."""
        held = [0] * len(PRIORITIES)
        for slot in self._mine.values():
            held[slot.rank] += 1
        return dict(zip(PRIORITIES, held, strict=True))

    def key_by_priority(self) -> tuple[dict[Priority, int], dict[Priority, int]]:
        """Return the key's creates waiting for a slot and its slots taken, each by
        priority, over every process, as ``refresh`` last read them."""
        return self._key_waiting, self._key_slots

    async def acquire_slot(self, priority: Priority = "normal") -> None:
        """Wait for a task slot, across every process of the key: highest ``priority``
        first, first come first served within one. Creates below ``interactive`` leave
        the last ``reserved`` slots free while any process saw an interactive create
        in the last ``lend_after`` seconds, and a create that waited ``starve_after``
        seconds is served with the interactive ones."""
        rank = rank_of(priority)
        reserved, lend_after, starve_after = self._rules
        lend_ms = -1.0 if lend_after is None else lend_after * 1000
        loop = asyncio.get_running_loop()
        since = loop.time()
        ticket = f"{self.owner}:t{next(self._members)}"
        granted = False
        self._waiting_by_rank[rank] += 1
        try:
            while True:
                await self._wait_registered()
                freed = self._slots_freed
                result, wait_ms, epoch, used = await self._script(
                    "acquire",
                    [
                        self._key("slots"),
                        self._key("tickets"),
                        self._key("owners"),
                        self._key("seq"),
                        self._key("slot_limit"),
                        self._key("epoch"),
                        self._key("pause"),
                        self._key("recover"),
                        self._key("interactive"),
                    ],
                    [
                        self._known_epoch,
                        self.owner,
                        ticket,
                        self.limits.concurrent_tasks,
                        self.reregister_round * 1000,
                        served_as(rank, since, loop.time(), starve_after),
                        # Only a process that reserves slots speaks for the reserve:
                        # one that reserves none (a batch host adopting a running
                        # task at the highest priority) leaves the service's alone.
                        "1" if rank == 0 and reserved else "0",
                        reserved,
                        lend_ms,
                        rank,
                    ],
                )
                self._note_epoch(epoch)
                if int(used):
                    self._slots_in_use = int(used)
                if int(result) == 1:
                    granted = True
                    self._mine[ticket] = _Slot(rank=rank)
                    return
                if int(result) == -1:
                    # Our lease lapsed (a long pause, a partition): re-register first.
                    self._registered.clear()
                    self._outbox_ready.set()
                    continue
                # Wake when any process frees a slot, or when the next hold runs out;
                # a slow look now and then covers a lost message.
                timeout = float(wait_ms) / 1000 if float(wait_ms) > 0 else self.lease / 3
                with anyio.move_on_after(min(timeout, self.lease / 3)):
                    await freed.wait()
                await asyncio.sleep(self._random.uniform(0, 0.005))
        finally:
            self._waiting_by_rank[rank] -= 1
            if not granted:
                self._send("cancel", ticket)

    async def _wait_registered(self) -> None:
        if self._registered.is_set():
            return
        self._outbox_ready.set()
        with anyio.move_on_after(self.redis_timeout + self.lease):
            await self._registered.wait()
            return
        raise RedisUnavailableError(
            f"could not register with Redis at {_safe_url(self.url)} "
            f"within {self.redis_timeout + self.lease:g} s"
        )

    def bind_slot(self, task_id: str, model: str, priority: Priority = "normal") -> None:
        """Record that a slot of this process is held by ``task_id`` (adopted if we die)."""
        token = self._unbound(sent=True, rank=rank_of(priority))
        if token is not None:
            slot = self._mine[token]
            slot.task_id, slot.model = task_id, model
            self._send("bind", token, task_id, model)

    def release_slot(self, task_id: str | None = None, priority: Priority = "normal") -> None:
        """Give back the slot of ``task_id`` (or, with None, one with no task) to every
        process. A task whose slot this process no longer holds (adopted by another while
        our lease had lapsed) frees nothing: never a slot that another task or create holds.
        """
        # With no task: a create that failed or never went; of the slots with no task,
        # one never marked sent goes first, so those marked stay at least as many as the
        # creates whose bytes may be out (a dead process's marked slots are held).
        rank = rank_of(priority)
        token = self._unbound(sent=False, rank=rank) if task_id is None else self._find(task_id)
        if token is None:
            return
        del self._mine[token]
        self._send("free", token)
        self._backoff.slot_freed()
        self._creates.wake()  # a create refused for slots may find this one

    def release_slot_later(self, delay: float, priority: Priority = "normal") -> None:
        """Hold a slot with no task for ``delay`` seconds (an uncertain create), then free it."""
        token = self._unbound(sent=True, rank=rank_of(priority))
        if token is None:
            return
        self._mine[token].free_at = asyncio.get_running_loop().time() + delay
        self._send("hold", token, f"{delay * 1000:.3f}")

    def _find(self, task_id: str) -> str | None:
        for token, slot in self._mine.items():
            if slot.task_id == task_id and slot.free_at is None:
                return token
        return None

    def _unbound(self, *, sent: bool, rank: int = 1) -> str | None:
        """Return a slot of ours with no task and no hold: one marked ``sent`` if any,
        of priority ``rank`` first (so the slots by priority stay true)."""
        best, best_score = None, -1
        for token, slot in self._mine.items():
            if not slot.task_id and slot.free_at is None:
                score = 2 * (slot.sent == sent) + (slot.rank == rank)
                if score == 3:
                    return token
                if score > best_score:
                    best, best_score = token, score
        return best

    # --- news between processes -----------------------------------------------------------

    def share(
        self, status: TaskStatus, *, trusted: bool, nonce: str | None = None, seen: bool = False
    ) -> None:
        """Publish news of a task to every process; the one tracking it takes it."""
        payload = json.dumps(
            {
                "kind": "news",
                "trusted": trusted,
                "nonce": nonce,
                "seen": seen,
                "status": json.loads(_status_encoder.encode(status)),
            }
        )
        self._send("news", "", payload)

    def _send(self, op: str, token: str = "", a: str = "", b: str = "") -> None:
        self._outbox += [op, token, a, b]
        self._outbox_ready.set()

    # --- background work ------------------------------------------------------------------

    async def run(self, news: TaskNews) -> None:
        """Renew this process's lease, adopt dead processes' tasks, carry reports and news."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._listen, news)
            await self._maintain(news)

    async def _maintain(self, news: TaskNews) -> None:
        loop = asyncio.get_running_loop()
        interval = self.lease / 3
        look_every = self.reregister_round / _ROUND_PARTS
        while True:
            try:
                await self._flush()
                if (
                    self._renewed_at is None
                    or loop.time() - self._renewed_at >= interval
                    or (not self._registered.is_set())
                ):
                    await self._renew(news)
                elif self._watched_at is None or loop.time() - self._watched_at >= look_every:
                    await self._watch_epoch(news)
            except RedisUnavailableError as exc:
                # Keep the reports; callers waiting for permits raise on their own deadline.
                logger.warning("shared governor: %s", exc)
            if self._renewed_at is not None and loop.time() - self._renewed_at > self.lease:
                self._registered.clear()  # the lease may have lapsed: no creates until renewed
            due = (
                interval if self._renewed_at is None else self._renewed_at + interval - loop.time()
            )
            if self._watched_at is not None:
                due = min(due, self._watched_at + look_every - loop.time())
            self._outbox_ready.clear()
            if not self._outbox:
                with anyio.move_on_after(max(due, _MIN_WAIT)):
                    await self._outbox_ready.wait()

    async def _watch_epoch(self, news: TaskNews) -> None:
        """Look whether Redis still holds the key's data (one GET); if it lost it, write
        this process's slots and grants back now, within the newcomers' round."""
        redis = self._client()
        epoch = await self._patiently(lambda: redis.get(self._key("epoch")))
        self._watched_at = asyncio.get_running_loop().time()
        if epoch != self._epoch:
            self._reregister = True
            await self._renew(news)

    async def _flush(self) -> None:
        while self._outbox:
            ops, self._outbox = self._outbox, []
            try:
                factor, slot_limit, used, limited, waiters = await self._script(
                    "apply",
                    [
                        self._key("slots"),
                        self._key("tickets"),
                        self._key("pause"),
                        self._key("factor"),
                        self._key("slot_limit"),
                        self._key("limited"),
                        self._key("poll_line"),
                        self._key("poll_due"),
                    ],
                    [self.owner, self._channel, self.limits.concurrent_tasks, *ops],
                )
            except BaseException:
                self._outbox[:0] = ops  # sent again once Redis answers
                raise
            self._rate_factor = float(factor)
            self._slot_limit = int(slot_limit)
            self._slots_in_use = int(used)
            self._rate_limited_seen = int(limited)
            self._slot_waiters = int(waiters)

    async def _renew(self, news: TaskNews) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        held: list[Any] = []
        for token, slot in list(self._mine.items()):
            hold_ms = 0.0
            if slot.free_at is not None:
                hold_ms = (slot.free_at - now) * 1000
                if hold_ms <= 0:
                    del self._mine[token]  # Redis frees it by its own clock
                    continue
            held += [token, slot.task_id, slot.model, f"{hold_ms:.3f}", int(slot.sent), slot.rank]
        grants = json.dumps([[at, member] for at, member in self._grants])
        epoch, lost, adopted, used, slot_limit, factor, in_window = await self._script(
            "renew",
            [
                self._key("owners"),
                self._key("slots"),
                self._key("tickets"),
                self._key("epoch"),
                self._key("pause"),
                self._key("recover"),
                self._key("grants"),
                self._key("factor"),
                self._key("slot_limit"),
            ],
            [
                self._known_epoch,
                self.owner,
                self.lease * 1000,
                self._window * 1000,
                self.uncertain_hold * 1000,
                self._channel,
                self.limits.period * 1000,
                self.limits.concurrent_tasks,
                "1" if self._reregister else "0",
                self.reregister_round * 1000,
                grants,
                *held,
            ],
        )
        if self._reregister or (self._epoch and epoch != self._epoch):
            logger.warning(
                "Redis lost the governor's data: slots and the last window's grants written "
                "back, %g s paused",
                self.reregister_round,
            )
        self._reregister = False
        self._epoch = epoch
        self._renewed_at = self._watched_at = now
        self._registered.set()
        if self._rules[0] and not self._announced:
            # The reserve holds from this process's start, not from its first user.
            reserved, lend_after, _ = self._rules
            lend_ms = -1.0 if lend_after is None else lend_after * 1000
            await self._script("announce", [self._key("interactive")], [reserved, lend_ms])
            self._announced = True
        for token in lost:
            gone = self._mine.pop(token) if token in self._mine else None
            if gone is not None and not gone.task_id and gone.free_at is None:
                self._slots_owed += 1  # a create of ours still goes on it: it takes another
            elif gone is not None and gone.task_id:
                # Another process adopted it while our lease had lapsed: it polls the task
                # and holds its slot now; its end still reaches us as news.
                logger.warning(
                    "task %s was adopted by another process while this one's lease had "
                    "lapsed; no longer polled here",
                    gone.task_id,
                )
                news.hand_over(gone.task_id, gone.model)
        for token, task_id, model in zip(adopted[::3], adopted[1::3], adopted[2::3], strict=True):
            logger.warning("adopting task %s of a process that stopped", task_id)
            self._mine[token] = _Slot(task_id=task_id, model=model)
            news.adopt(task_id, model)
        self._slots_in_use = int(used)
        self._slot_limit = int(slot_limit)
        self._rate_factor = float(factor)
        self._in_window = int(in_window)

    @property
    def _known_epoch(self) -> str:
        return self._epoch or ("*" if self._trust_empty else "")

    def _note_epoch(self, epoch: str) -> None:
        if self._epoch and epoch != self._epoch:
            # The data was lost: re-register our slots before anyone creates.
            self._reregister = True
            self._registered.clear()
            self._outbox_ready.set()
        self._epoch = epoch

    async def _listen(self, news: TaskNews) -> None:
        """Follow the news channel: freed slots wake waiters, task news goes to the client."""
        attempt = 0
        while True:
            pubsub = self._client().pubsub()
            try:
                await pubsub.subscribe(self._channel)
                attempt = 0
                self._wake_slot_waiters()  # anything freed while we were away
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is not None:
                        self._take(message.get("data"), news)
            except (RedisError, OSError):
                attempt += 1
                await asyncio.sleep(self._reconnect_pause(attempt))
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    # cast: redis-py types aclose from 8.2 on, not before
                    await cast(Any, pubsub).aclose()

    def _take(self, data: object, news: TaskNews) -> None:
        try:
            message = json.loads(data) if isinstance(data, str) else None
            if not isinstance(message, dict):
                return
            if message.get("kind") == "freed":
                self._wake_slot_waiters()
            elif message.get("kind") == "news":
                status = _status_decoder.decode(json.dumps(message["status"]))
                nonce = message.get("nonce")
                news.announce(
                    status,
                    bool(message.get("trusted")),
                    nonce if isinstance(nonce, str) else None,
                    message.get("seen") is True,
                )
        except (ValueError, KeyError, TypeError, msgspec.MsgspecError, RecursionError):
            logger.warning("ignored a malformed message on %s", self._channel)

    def _wake_slot_waiters(self) -> None:
        self._slots_freed.set()
        self._slots_freed = asyncio.Event()
        self._creates.wake()  # another process freed a slot of the key

    async def aclose(self) -> None:
        """Hand this process's tasks to the others at once, and close the connection.

        Their tasks still run on the service: a live process adopts and polls them.
        """
        if self._redis is None:
            return
        try:
            with anyio.move_on_after(2.0):
                await self._flush()
                if self._renewed_at is not None:  # a watcher (refresh() only) never joined
                    await self._redis.zadd(self._key("owners"), {self.owner: 0})
        except (RedisError, OSError, RedisUnavailableError):
            logger.warning("could not tell Redis that this process stopped; its lease will lapse")
        finally:
            await self._redis.aclose()
            self._redis = None


def redis_url_and_key(url: str | None, api_key: str | None) -> tuple[str, str]:
    """Return the Redis URL and the API key (from the environment when not given);
    raise InputError naming ``url`` or ``api_key`` when one is missing or malformed."""
    url = url or os.environ.get("SORA_ASYNC_REDIS_URL") or ""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise InputError(
            "url", "must be a redis://, rediss:// or unix:// URL (or set SORA_ASYNC_REDIS_URL)"
        )
    key = api_key if api_key is not None else os.environ.get("APIXO_API_KEY")
    if not key:
        raise InputError("api_key", "is required: pass api_key= or set APIXO_API_KEY")
    return url, key


def reconnect_pause(
    attempt: int, rng: random.Random, longest: float = _LONGEST_RECONNECT_PAUSE
) -> float:
    """Return how long to wait before trying Redis again (backed off, jittered, at most
    ``longest`` seconds)."""
    return min(longest, 0.05 * 2.0**attempt) * rng.uniform(0.5, 1.0)


async def patiently(
    call: Callable[[], Awaitable[_T]],
    *,
    url: str,
    timeout: float,
    rng: random.Random,
    longest_pause: float = _LONGEST_RECONNECT_PAUSE,
) -> _T:
    """Return ``call()``'s answer, waiting out a Redis outage for up to ``timeout``
    seconds (backed off, jittered by ``rng``); then raise RedisUnavailableError.
    Nothing that needs Redis's word goes ahead without it."""
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    attempt = 0
    while True:
        try:
            result = await call()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            now = loop.time()
            if deadline is None:
                deadline = now + timeout
                logger.warning("Redis unreachable (%s): waiting, nothing is sent", exc)
            if now >= deadline:
                raise RedisUnavailableError(
                    f"Redis at {_safe_url(url)} unreachable for {timeout:g} s: {exc}"
                ) from exc
            attempt += 1
            pause = reconnect_pause(attempt, rng, longest_pause)
            await asyncio.sleep(min(pause, max(deadline - now, _MIN_WAIT)))
            continue
        except RedisError as exc:
            raise RedisUnavailableError(f"Redis refused a command: {exc}") from exc
        if deadline is not None:
            logger.warning("Redis reachable again")
        return result


def _safe_url(url: str) -> str:
    """Return the URL without a password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
