"""A faithful fake of the APIXO task API, for testing code that uses it.

:class:`FakeApixo` serves the API on loopback inside the running event loop
(so ``looptime`` can fast-forward hours of generations), enforces the key's
limits on the server clock, injects faults, and counts what it saw in
:attr:`FakeApixo.stats`. :func:`serve` and ``python -m sora_async.testing``
run it standalone.
"""

from ._fake import DEFAULT_MODEL_LIMITS, DEFAULT_MODELS, FakeApixo
from ._faults import Fault, FaultSpec
from ._redis import RedisServer, redis_server_binary
from ._serve import main, serve
from ._state import Stats, TaskRecord, TaskState
from ._timing import GenerationTime, fixed, heavy_tailed, lognormal, uniform

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_MODEL_LIMITS",
    "FakeApixo",
    "Fault",
    "FaultSpec",
    "GenerationTime",
    "RedisServer",
    "Stats",
    "TaskRecord",
    "TaskState",
    "fixed",
    "heavy_tailed",
    "lognormal",
    "main",
    "redis_server_binary",
    "serve",
    "uniform",
]
