"""sora-async: an asyncio-native client for the APIXO task API and its model catalogue.

It keeps every request inside one API key's limits (60 requests a minute, 10
unfinished tasks), fills every task slot the moment it frees, and never pays twice
for one prompt.
"""

from typing import TYPE_CHECKING, Any

from ._batch import (
    BatchDefaults,
    BatchLineError,
    BatchProgress,
    BatchReport,
    load_requests,
    run_batch,
)
from ._catalog import (
    MODELS,
    Kling25TurboPro,
    ModelInfo,
    ModelInput,
    NanoBanana,
    NanoBanana2,
    RawInput,
    Sora2,
    Veo31,
    Veo31Extend,
    Wan25,
)
from ._client import Outcome, SoraClient
from ._errors import (
    APIError,
    AuthenticationError,
    BudgetExceededError,
    ClientClosedError,
    ContentPolicyError,
    IdempotencyConflictError,
    InputError,
    InsufficientCreditsError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    RedisUnavailableError,
    ServerError,
    SoraError,
    StoreLossError,
    SubmitUncertainError,
    TaskAbandonedError,
    TaskFailedError,
    TaskTimeoutError,
    TransportError,
)
from ._governor import Governor, LocalGovernor
from ._journal import ItemState
from ._models import (
    ImageToVideo,
    Limits,
    Result,
    TaskState,
    TaskStatus,
    TextToVideo,
    Video,
    VideoRequest,
)
from ._prices import Estimate, Price, estimate, load_prices
from ._priority import PRIORITIES, Priority
from ._scheduler import PollPolicy
from ._snapshot import ModelSnapshot, Snapshot
from ._store import MemoryStore, RecordState, SQLiteStore, TaskRecord, TaskStore
from ._transport import RetryPolicy

if TYPE_CHECKING:
    from .redis_governor import RedisGovernor
    from .redis_store import RedisStore

__version__ = "0.1.0"
"""The version of this package."""

__all__ = [
    "MODELS",
    "PRIORITIES",
    "APIError",
    "AuthenticationError",
    "BatchDefaults",
    "BatchLineError",
    "BatchProgress",
    "BatchReport",
    "BudgetExceededError",
    "ClientClosedError",
    "ContentPolicyError",
    "Estimate",
    "Governor",
    "IdempotencyConflictError",
    "ImageToVideo",
    "InputError",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "ItemState",
    "Kling25TurboPro",
    "Limits",
    "LocalGovernor",
    "MemoryStore",
    "ModelInfo",
    "ModelInput",
    "ModelSnapshot",
    "NanoBanana",
    "NanoBanana2",
    "NotFoundError",
    "Outcome",
    "PermissionDeniedError",
    "PollPolicy",
    "Price",
    "Priority",
    "ProtocolError",
    "RateLimitError",
    "RawInput",
    "RecordState",
    "RedisGovernor",
    "RedisStore",
    "RedisUnavailableError",
    "Result",
    "RetryPolicy",
    "SQLiteStore",
    "ServerError",
    "Snapshot",
    "Sora2",
    "SoraClient",
    "SoraError",
    "StoreLossError",
    "SubmitUncertainError",
    "TaskAbandonedError",
    "TaskFailedError",
    "TaskRecord",
    "TaskState",
    "TaskStatus",
    "TaskStore",
    "TaskTimeoutError",
    "TextToVideo",
    "TransportError",
    "Veo31",
    "Veo31Extend",
    "Video",
    "VideoRequest",
    "Wan25",
    "__version__",
    "estimate",
    "load_prices",
    "load_requests",
    "run_batch",
]


def __getattr__(name: str) -> Any:
    # RedisGovernor needs the "redis" extra: import it only when asked for.
    if name == "RedisGovernor":
        from .redis_governor import RedisGovernor

        return RedisGovernor
    if name == "RedisStore":
        from .redis_store import RedisStore

        return RedisStore
    raise AttributeError(f"module 'sora_async' has no attribute {name!r}")
