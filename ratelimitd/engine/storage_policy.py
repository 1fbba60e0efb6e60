"""What a decision answers when storage cannot be reached (RATELIMITD_ON_STORAGE_ERROR).

- ``unavailable`` (the default): the error goes to the caller (gRPC UNAVAILABLE), with
  what it can do about it;
- ``allow``: the request is admitted, unlimited (fail open);
- ``deny``: the request is refused (fail closed).

Either of the last two answers with REASON_STORAGE_UNAVAILABLE (engine/outcomes.py).
"""

from __future__ import annotations

from ratelimitd.core.errors import StorageOutcomeUnknown, StorageUnavailable


class StoragePolicy:
    def __init__(self, on_storage_error: str) -> None:
        """``on_storage_error``: one of the three above (settings.py checks it)."""
        self._policy = on_storage_error

    def admits(self, error: StorageUnavailable, request_id: str) -> bool:
        """Whether a decision that met ``error`` admits its request; raises it (with advice)
        when the policy is to answer with the error."""
        if self._policy != "unavailable":
            return self._policy == "allow"
        if request_id or not isinstance(error, StorageOutcomeUnknown):
            raise error
        # Without a request id the call cannot be retried exactly: say so.
        raise error.advising(
            f"{StorageOutcomeUnknown.RETRY_EXACTLY}. This call had no request_id, so a retry is a new decision"
        ) from error
