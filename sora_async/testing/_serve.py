"""Run the fake APIXO service standalone, from code or the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ._fake import FakeApixo
from ._faults import Fault, FaultPlan
from ._timing import GenerationTime, fixed, heavy_tailed, lognormal, uniform

__all__ = ["main", "parse_fault", "parse_generation", "serve"]

_DISTRIBUTIONS: dict[str, Callable[..., GenerationTime]] = {
    "lognormal": lognormal,
    "uniform": uniform,
    "fixed": fixed,
    "heavy_tailed": heavy_tailed,
}


def parse_generation(spec: str) -> GenerationTime:
    """Parse ``NAME:ARG,ARG`` (e.g. ``lognormal:180,0.4``, ``fixed:30``) into a distribution.

    Raises:
        ValueError: unknown name or bad arguments.
    """
    name, _, args = spec.partition(":")
    factory = _DISTRIBUTIONS.get(name.strip().replace("-", "_"))
    if factory is None:
        raise ValueError(f"unknown distribution {name!r}; use one of {', '.join(_DISTRIBUTIONS)}")
    values = [float(arg) for arg in args.split(",") if arg.strip()]
    try:
        distribution: GenerationTime = factory(*values)
    except TypeError as exc:
        raise ValueError(f"bad arguments for {name}: {args!r}") from exc
    return distribution


def parse_fault(spec: str) -> dict[str, Any]:
    """Parse ``KIND:ON[:TIMES[:DELAY]]`` (e.g. ``slow:create:2:5``) into the keyword
    arguments of :meth:`FakeApixo.inject`.

    Raises:
        ValueError: a bad kind, target, count or delay.
    """
    kind, _, rest = spec.partition(":")
    on, _, rest = rest.partition(":")
    times, _, delay = rest.partition(":")
    try:
        fault = Fault(kind.strip())
        count, seconds = int(times or 1), float(delay or 0)
        target: Any = on or "any"  # the plan checks the target, the count and the delay
        FaultPlan().add(fault, on=target, times=count, status=503, delay=seconds, retry_after=None)
    except ValueError as exc:
        raise ValueError(f"bad fault {spec!r}: {exc}") from exc
    return {"kind": fault, "on": target, "times": count, "delay": seconds}


async def _run(
    host: str, port: int, knobs: dict[str, Any], faults: Sequence[dict[str, Any]] = ()
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with FakeApixo(host=host, port=port, **knobs) as fake:
        for fault in faults:
            fake.inject(**fault)
        print(f"APIXO_BASE_URL={fake.url}", flush=True)
        print(f"APIXO_API_KEY={fake.api_key}", flush=True)
        print(f"counters: GET {fake.origin}/fake/stats", flush=True)
        await stop.wait()


def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    faults: Sequence[dict[str, Any]] = (),
    **knobs: Any,
) -> None:
    """Serve a :class:`FakeApixo` until Ctrl-C or SIGTERM (blocking).

    Prints ``APIXO_BASE_URL=...`` and ``APIXO_API_KEY=...`` once listening.
    ``knobs`` are :class:`FakeApixo` keyword arguments; ``faults`` are
    :meth:`FakeApixo.inject` keyword arguments, queued at start in order.
    """
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(host, port, knobs, faults))


def main(argv: Sequence[str] | None = None, prog: str = "python -m sora_async.testing") -> int:
    """Parse command-line knobs and :func:`serve`; return the exit status.

    ``prog`` is the command's name in its usage and help.
    """
    parser = argparse.ArgumentParser(prog=prog, description="Fake APIXO task API on loopback.")
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8765, help="0 picks a free port")
    add("--api-key", default="test-key")
    add("--requests", type=int, default=60, help="requests per window (default 60)")
    add("--period", type=float, default=60.0, help="window length in seconds (default 60)")
    add("--concurrent-tasks", type=int, default=10)
    add(
        "--generation",
        default="lognormal:180,0.4",
        metavar="DIST",
        help="lognormal:MEAN,SIGMA | uniform:LOW,HIGH | fixed:S | heavy_tailed:LOW,HIGH,ALPHA",
    )
    add("--pending-time", type=float, default=2.0)
    add("--failure-rate", type=float, default=0.0)
    add("--fail-code", default="GENERATION_FAILED")
    add("--seed", type=int, default=0)
    add("--balance", type=float, default=100.0)
    add("--price-per-second", type=float, default=0.3)
    add("--retry-after", type=float, default=None, help="send Retry-After on 429s")
    add(
        "--state",
        default=None,
        metavar="FILE",
        help="keep the tasks made in FILE and take them back at the next start",
    )
    add("--chaos", type=float, default=0.0, help="share of requests given a random fault")
    add(
        "--fault",
        action="append",
        default=[],
        metavar="KIND:ON[:TIMES[:DELAY]]",
        help="queue a fault at start, e.g. slow:create:2:5 (the next 2 creates answer 5 s "
        "late, their tasks made then); repeatable",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.chaos <= 1.0:
        parser.error("--chaos must be between 0 and 1")
    try:
        generation = parse_generation(args.generation)
        faults = [parse_fault(spec) for spec in args.fault]
    except ValueError as exc:
        parser.error(str(exc))
    try:
        serve(
            args.host,
            args.port,
            api_key=args.api_key,
            requests=args.requests,
            period=args.period,
            concurrent_tasks=args.concurrent_tasks,
            generation_time=generation,
            pending_time=args.pending_time,
            failure_rate=args.failure_rate,
            fail_code=args.fail_code,
            seed=args.seed,
            balance=args.balance,
            price_per_second=args.price_per_second,
            retry_after=args.retry_after,
            state_file=args.state,
            chaos=args.chaos,
            faults=faults,
        )
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
