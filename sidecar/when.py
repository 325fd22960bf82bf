"""Times given by operators (`/usage?from=`, `sidecar usage --from`): epoch seconds or RFC 3339."""

from __future__ import annotations

import math
from datetime import UTC, datetime

MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z
WHEN_RULE = "must be epoch seconds or RFC 3339 between 1970 and 9999"


def parse_when(name: str, value: str) -> int:
    """Epoch seconds from epoch seconds or RFC 3339 (a missing offset means UTC).

    Raises ValueError whose message starts with `name` and states the rule.
    """
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(number) or not 0 <= number <= MAX_EPOCH:
            raise ValueError(f"{name}: {WHEN_RULE}")
        return int(number)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name}: {WHEN_RULE}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    epoch = dt.timestamp()
    if not 0 <= epoch <= MAX_EPOCH:
        raise ValueError(f"{name}: {WHEN_RULE}")
    return int(epoch)
