"""A client for ratelimitd: may this key call this model now, and what is left?

    from ratelimitd_client import Client
    decision = Client("127.0.0.1:50051").check(api_key, "llama-3.1-8b-instant", tokens=900)
    if not decision.allowed: ...  # decision.http() is the 429/413/401/403 answer to send

See README.md.
"""

from ratelimitd_client.asgi import RateLimitMiddleware
from ratelimitd_client.client import (
    AsyncClient,
    CheckResponse,
    Client,
    Decision,
    Options,
    RateLimitdError,
    RateLimitdUnavailable,
    ReportUsageResponse,
    new_request_id,
)
from ratelimitd_client.http import HttpAnswer

__all__ = [
    "AsyncClient",
    "CheckResponse",
    "Client",
    "Decision",
    "HttpAnswer",
    "Options",
    "RateLimitMiddleware",
    "RateLimitdError",
    "RateLimitdUnavailable",
    "ReportUsageResponse",
    "new_request_id",
]
