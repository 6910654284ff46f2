"""One place maps service answers to exceptions, whether the HTTP status or the body says so."""

from __future__ import annotations

import pytest

import sora_async as sa
from sora_async._errors import error_from_response


@pytest.mark.parametrize(
    ("http_status", "code", "message", "expected"),
    [
        (401, 401, "Invalid or missing API key", sa.AuthenticationError),
        (200, 401, "Invalid or missing API key", sa.AuthenticationError),
        (402, 402, "Insufficient balance", sa.InsufficientCreditsError),
        (400, 400, "Insufficient credits", sa.InsufficientCreditsError),
        (200, 400, "Insufficient credits", sa.InsufficientCreditsError),
        (
            400,
            400,
            "Content violates provider policy, please adjust the prompt",
            sa.ContentPolicyError,
        ),
        (403, 403, "Content violates policy", sa.ContentPolicyError),
        (403, 403, "Forbidden: key lacks permission", sa.PermissionDeniedError),
        (404, 404, "Task not found", sa.NotFoundError),
        (400, 400, "Invalid parameters", sa.InvalidRequestError),
        (200, 400, "Invalid parameters", sa.InvalidRequestError),
        (422, 422, "Unprocessable", sa.InvalidRequestError),
        (429, 429, "Rate limit exceeded", sa.RateLimitError),
        (200, 429, "Rate limit exceeded", sa.RateLimitError),
        (500, 500, "Internal error", sa.ServerError),
        (200, 503, "Unavailable", sa.ServerError),
        (502, 200, "Bad gateway", sa.ServerError),
    ],
)
def test_every_documented_error_maps_to_its_class(
    http_status: int, code: int, message: str, expected: type[sa.APIError]
) -> None:
    """The class follows the error code from either the HTTP status or the body."""
    error = error_from_response(http_status, code, message, None)
    assert type(error) is expected
    assert isinstance(error, sa.SoraError)
    assert error.message == message
    assert error.code == (code if code >= 400 else http_status)


def test_error_text_carries_the_services_detail() -> None:
    """A 400 with data.error shows that detail in the message."""
    error = error_from_response(400, 400, "Bad request", {"error": "Missing required field"})
    assert "Missing required field" in str(error)
