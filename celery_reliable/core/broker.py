"""Facts about the app's broker that several features need.

Examples:
    >>> broker_is_redis(app)
    True
"""

from __future__ import annotations

from typing import Any

#: URL schemes served by kombu's Redis transport.
REDIS_BROKER_SCHEMES = ("redis", "rediss", "sentinel", "socket", "redis+socket")


def broker_is_redis(app: Any) -> bool:
    """True when ``app``'s broker is kombu's Redis transport."""
    url = app.conf.broker_url or ""
    if not isinstance(url, str):
        return False
    return url.split(";")[0].split("://")[0].lower() in REDIS_BROKER_SCHEMES
