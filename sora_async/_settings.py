"""The checks of a SoraClient's settings: a bad one is an InputError naming it."""

from __future__ import annotations

from collections.abc import Collection

from ._catalog import check_model_id
from ._errors import InputError
from ._models import PROVIDERS, check_choice, check_http_url
from ._store import TaskStore

__all__ = ["check_settings"]


def check_settings(
    *,
    model: object,
    provider: object,
    on_uncertain: object,
    wait_timeout: float,
    uncertain_hold: float,
    download_concurrency: int,
    max_download_bytes: int,
    callback_url: str | None,
    store: object,
    model_limits: Collection[object],
    governors: Collection[object],
) -> None:
    """Raise InputError naming the first bad setting (``model_limits`` and
    ``governors``: the models they name)."""
    check_model_id(model)
    check_choice("provider", provider, PROVIDERS)
    check_choice("on_uncertain", on_uncertain, ("raise", "resubmit"))
    if wait_timeout <= 0:
        raise InputError("wait_timeout", "must be a positive number of seconds")
    if uncertain_hold < 0:
        raise InputError("uncertain_hold", "must be zero or more seconds")
    if isinstance(download_concurrency, bool) or download_concurrency < 1:
        raise InputError("download_concurrency", "must be a whole number of at least 1")
    if isinstance(max_download_bytes, bool) or max_download_bytes < 1:
        raise InputError("max_download_bytes", "must be a whole number of at least 1")
    if callback_url is not None:
        check_http_url("callback_url", callback_url)
    if store is not None and not isinstance(store, TaskStore):
        raise InputError("store", "must be a task store, like sa.SQLiteStore(path)")
    for other in model_limits:
        check_model_id(other, "model_limits")
    for other in governors:
        check_model_id(other, "governors")
