"""The spend cap: every create reserves its high estimate first, or is not sent.

Before a create, the spend so far, the reservations of the tasks in flight and this
request's high estimate must stay within the cap. A reservation is made under a
token, bound to its task id once the create answers, and settled when the task
ends: kept as spend when it succeeded (the provider bills it), given back when it
failed or the create was refused (the provider bills neither). A create whose answer
never came keeps its reservation: it may have made a task.

:class:`LocalBudget` keeps one process's spend; :class:`RedisBudget` keeps one budget
for every process and host of a key, each step one atomic script on Redis.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Protocol

from ._errors import BudgetExceededError, InputError

__all__ = [
    "Budget",
    "LocalBudget",
    "RedisBudget",
    "budget_for",
    "check_cap",
    "spend_by_scope",
    "spend_keys",
]

# Sums in USD are compared with this slack, so that float rounding never refuses a
# create that fits the cap exactly.
_SLACK = 1e-9


def check_cap(cap: object, field: str = "spend_cap") -> float:
    """Return ``cap`` as USD, or raise InputError naming ``field``."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap >= 0:
        raise InputError(field, f"must be a number of USD, zero or more; got {cap!r}")
    return float(cap)


class Budget(Protocol):
    """Reservations against a spend cap (see the module's docstring)."""

    cap: float

    async def reserve(self, token: str, usd: float) -> None:
        """Reserve ``usd`` under ``token``, or raise BudgetExceededError."""

    async def bind(self, token: str, task_id: str) -> None:
        """Move ``token``'s reservation to the task its create made."""

    async def settle(self, key: str, paid: bool) -> float:
        """Keep the reservation under ``key`` as spend (``paid``) or give it back;
        return the USD it held (0 when none: settled already, or never made)."""

    async def figures(self) -> tuple[float, float]:
        """Return the spend so far and the sum reserved by tasks in flight, in USD."""

    async def add_spent(self, usd: float) -> None:
        """Count ``usd`` as spent (tasks paid before this budget was opened)."""

    def seen(self) -> tuple[float, float]:
        """Return the spend and the reservations as last known (no request)."""

    async def aclose(self) -> None:
        """Release what the budget holds open."""


class LocalBudget:
    """One process's spend against ``cap`` USD."""

    def __init__(self, cap: float) -> None:
        self.cap = check_cap(cap)
        self.spent = 0.0
        self._held: dict[str, float] = {}

    async def reserve(self, token: str, usd: float) -> None:
        """Reserve ``usd`` under ``token``, or raise BudgetExceededError."""
        held = self.spent + sum(self._held.values())
        if held + usd > self.cap + _SLACK:
            raise BudgetExceededError(self.cap, held, usd)
        self._held[token] = usd

    async def bind(self, token: str, task_id: str) -> None:
        """Move ``token``'s reservation to the task its create made."""
        if token in self._held:
            self._held[task_id] = self._held.pop(token)

    async def settle(self, key: str, paid: bool) -> float:
        """Keep the reservation under ``key`` as spend (``paid``) or give it back."""
        usd = self._held.pop(key, 0.0)
        if paid:
            self.spent += usd
        return usd

    async def figures(self) -> tuple[float, float]:
        """Return the spend so far and the sum reserved by tasks in flight, in USD."""
        return self.spent, sum(self._held.values())

    async def add_spent(self, usd: float) -> None:
        """Count ``usd`` as spent (tasks paid before this budget was opened)."""
        self.spent += usd

    def seen(self) -> tuple[float, float]:
        """Return the spend and the reservations now."""
        return self.spent, sum(self._held.values())

    async def aclose(self) -> None:
        """Nothing to close."""


# KEYS: spent, held, scopes. ARGV: token, usd, cap, scope. Returns {1 or 0, the spend,
# the reservations before this one}.
_RESERVE = """
redis.call('HSET', KEYS[3], ARGV[4], '1')
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local held = 0
for _, usd in ipairs(redis.call('HVALS', KEYS[2])) do held = held + tonumber(usd) end
if spent + held + tonumber(ARGV[2]) > tonumber(ARGV[3]) + 1e-9 then
    return {0, tostring(spent), tostring(held)}
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {1, tostring(spent), tostring(held + tonumber(ARGV[2]))}
"""

# KEYS: held. ARGV: token, task id.
_BIND = """
local usd = redis.call('HGET', KEYS[1], ARGV[1])
if usd then
    redis.call('HDEL', KEYS[1], ARGV[1])
    redis.call('HSET', KEYS[1], ARGV[2], usd)
end
return 1
"""

# KEYS: spent, held. ARGV: key, paid (1/0). Once per key, whoever sees the end first.
_SETTLE = """
local usd = redis.call('HGET', KEYS[2], ARGV[1])
if usd then
    redis.call('HDEL', KEYS[2], ARGV[1])
    if ARGV[2] == '1' then redis.call('INCRBYFLOAT', KEYS[1], usd) end
    return usd
end
return '0'
"""


def spend_keys(key_prefix: str, scope: str) -> tuple[str, str]:
    """Return the Redis keys of a scope's spend and of its reservations."""
    name = hashlib.sha256(scope.encode()).hexdigest()[:16]
    return f"{key_prefix}:spend:{name}:spent", f"{key_prefix}:spend:{name}:held"


async def spend_by_scope(redis: Any, key_prefix: str) -> dict[str, tuple[float, float]]:
    """Return each budget's spend and reservations on a key's Redis, by scope name."""
    found: dict[str, tuple[float, float]] = {}
    for raw in await redis.hkeys(f"{key_prefix}:spend:scopes"):
        scope = raw.decode() if isinstance(raw, bytes) else str(raw)
        spent_key, held_key = spend_keys(key_prefix, scope)
        spent = await redis.get(spent_key)
        held = await redis.hvals(held_key)
        found[scope] = (float(spent or 0), sum(float(usd) for usd in held))
    return found


class RedisBudget:
    """One spend against ``cap`` USD for every process of a key, named ``scope`` (a
    batch's name, or "" for the key's), on the Redis of ``governor`` (a RedisGovernor,
    whose connection settings and outage patience it shares)."""

    def __init__(self, governor: Any, cap: float, scope: str = "") -> None:
        self.cap = check_cap(cap)
        self._governor = governor
        # Every model of the key spends one budget: the key's prefix, not the model's.
        key_prefix = governor.key_prefix
        self.scope = scope
        self._spent, self._held = spend_keys(key_prefix, scope)
        self._scopes = f"{key_prefix}:spend:scopes"
        self._redis: Any = None
        self._rng = random.Random()
        self._scripts: dict[str, Any] = {}
        self._seen = (0.0, 0.0)

    def _client(self) -> Any:
        if self._redis is None:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(
                self._governor.url, socket_connect_timeout=2.0, socket_timeout=5.0
            )
            for name, lua in (("reserve", _RESERVE), ("bind", _BIND), ("settle", _SETTLE)):
                self._scripts[name] = self._redis.register_script(lua)
        return self._redis

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        from .redis_governor import patiently

        self._client()
        return await patiently(
            lambda: self._scripts[name](keys=keys, args=args),
            url=self._governor.url,
            timeout=self._governor.redis_timeout,
            rng=self._rng,
        )

    async def reserve(self, token: str, usd: float) -> None:
        """Reserve ``usd`` under ``token``, or raise BudgetExceededError."""
        granted, spent, held = await self._run(
            "reserve",
            [self._spent, self._held, self._scopes],
            [token, repr(usd), repr(self.cap), self.scope],
        )
        self._seen = (float(spent), float(held))
        if not int(granted):
            raise BudgetExceededError(self.cap, float(spent) + float(held), usd)

    async def bind(self, token: str, task_id: str) -> None:
        """Move ``token``'s reservation to the task its create made."""
        await self._run("bind", [self._held], [token, task_id])

    async def settle(self, key: str, paid: bool) -> float:
        """Keep the reservation under ``key`` as spend (``paid``) or give it back."""
        usd = await self._run("settle", [self._spent, self._held], [key, "1" if paid else "0"])
        return float(usd)

    async def figures(self) -> tuple[float, float]:
        """Return the spend so far and the sum reserved by tasks in flight, in USD."""
        from .redis_governor import patiently

        redis = self._client()

        async def read() -> tuple[float, float]:
            spent = await redis.get(self._spent)
            held = await redis.hvals(self._held)
            return float(spent or 0), sum(float(usd) for usd in held)

        self._seen = await patiently(
            read, url=self._governor.url, timeout=self._governor.redis_timeout, rng=self._rng
        )
        return self._seen

    async def add_spent(self, usd: float) -> None:
        """Nothing: the spend on Redis is every process's, and each counts its own
        tasks there (a rerun's paid tasks are there already)."""

    def seen(self) -> tuple[float, float]:
        """Return the spend and the reservations as last read from Redis (every
        process's), at the last reserve or figures."""
        return self._seen

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


def budget_for(
    governor: object, cap: float | None, scope: str, keep_balance: float | None
) -> Budget | None:
    """Return the budget a spend cap (or a balance to keep) asks for: one on Redis for
    every process of the key when the governor is shared through Redis."""
    if cap is None and keep_balance is None:
        return None
    usd = float("inf") if cap is None else check_cap(cap)
    if not isinstance(scope, str):
        raise InputError("spend_scope", "must be a string")
    if getattr(governor, "key_prefix", None) is not None:
        return RedisBudget(governor, usd, scope)
    return LocalBudget(usd)
