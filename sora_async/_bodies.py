"""The body of each create: the model a request goes to, and how its end is told."""

from __future__ import annotations

import secrets
from typing import Any

from ._callback_tokens import callback_url_with_token, new_token
from ._catalog import RawInput, Request, model_of
from ._models import CreateRequest

__all__ = ["Bodies"]


class Bodies:
    """Build create bodies for one client: polled (``async``) without a
    ``callback_url``, else ``callback`` with a token of its own per create."""

    def __init__(
        self, model: str, provider: str, callback_url: str | None, callback_secret: str | None
    ) -> None:
        self.model = model
        self.provider = provider
        self.callback_url = callback_url
        # A per-client secret in the callback URL's query lets the receiver tell the
        # provider's callbacks from forged ones (the provider signs nothing).
        if callback_url is not None and callback_secret is None:
            callback_secret = secrets.token_urlsafe(32)
        self.callback_secret = callback_secret or None

    def model_for(self, request: Request) -> str:
        """Return the model ``request`` goes to (InputError for anything else)."""
        return model_of(request, self.model)

    def body(self, request: Request) -> CreateRequest:
        """Return the create body for ``request`` (validated; nothing is sent)."""
        self.model_for(request)
        data: Any = request.input if isinstance(request, RawInput) else request
        provider: Any = self.provider
        if self.callback_url is None:
            return CreateRequest(input=data, request_type="async", provider=provider)
        return CreateRequest(
            input=data,
            request_type="callback",
            callback_url=self._callback_endpoint(self.callback_url),
            provider=provider,
        )

    def prepare(self, request: Request) -> tuple[str, CreateRequest]:
        """Return the model and the create body of ``request``."""
        return self.model_for(request), self.body(request)

    def _callback_endpoint(self, url: str) -> str:
        if self.callback_secret is None:
            return url
        # A token of its own per create: a claim of a task's end must carry its token.
        return callback_url_with_token(url, new_token(self.callback_secret))
