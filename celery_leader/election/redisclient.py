"""A redis-py client from a URL: one server, Sentinel or Cluster.

Celery-free: the election layer's way to reach Redis from configuration (the
Celery glue passes ``leader_redis_url`` and ``leader_redis_options``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlparse

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from .config import WAIT_MARGIN, ConfigurationError

REDIS_SCHEMES = ("redis", "rediss", "unix", "sentinel", "sentinels")


def default_socket_timeout(retry_period: float, wait_timeout: float = 0.0) -> float:
    """The lock client's socket timeout when the options set none.

    The retry period (at least 0.5 s), so a stalled connection counts as a failed
    renewal instead of blocking the elector forever; when writes WAIT for replicas
    (``wait_timeout`` > 0), longer than a WAIT by WAIT_MARGIN, so Redis's answer
    that no replica acknowledged arrives before the socket gives up.
    """
    timeout = max(0.5, float(retry_period))
    if wait_timeout > 0:
        timeout = max(timeout, wait_timeout + WAIT_MARGIN)
    return timeout


def redis_client_from_url(url: str, options: Mapping[str, Any], retry_period: float = 2.0,
                          transport_options: Mapping[str, Any] | None = None,
                          wait_timeout: float = 0.0) -> Any:
    """A redis-py client for a redis://, rediss://, unix:// or Celery-style
    ``sentinel://h1:p1;sentinel://h2:p2/db`` URL; ``options={"cluster": True}``
    makes a Redis Cluster client from any node's redis:// URL.

    Socket timeouts default to :func:`default_socket_timeout` (``wait_timeout``:
    how long the client's WAITs may block, 0 when it sends none).
    """
    connect_timeout = max(0.5, float(retry_period))
    kwargs: dict[str, Any] = {"socket_timeout": default_socket_timeout(retry_period, wait_timeout),
                              "socket_connect_timeout": connect_timeout,
                              "health_check_interval": 30}
    kwargs.update(options)
    if url.startswith(("sentinel://", "sentinels://")):
        sentinel_opts = dict(transport_options or {})
        master_name = kwargs.pop("master_name", None) or sentinel_opts.get("master_name")
        if not master_name:
            raise ConfigurationError(
                "leader_redis_options['master_name'] (or broker_transport_options"
                "['master_name']) is required with a sentinel:// URL"
            )
        sentinel_kwargs = kwargs.pop("sentinel_kwargs", None) or sentinel_opts.get(
            "sentinel_kwargs")
        if not sentinel_kwargs:
            # Same timeouts as the data connections and no retries: on a timeout
            # redis-py moves on to the next sentinel, so retrying a frozen one
            # only multiplies the stall.
            sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
            if "socket_timeout" not in options:  # sentinels never see a WAIT
                sentinel_kwargs["socket_timeout"] = connect_timeout
            sentinel_kwargs["retry"] = Retry(NoBackoff(), 0)
        hosts: list[tuple[str, int]] = []
        db = 0
        password = None
        for part in url.split(";"):
            parsed = urlparse(part)
            hosts.append((parsed.hostname or "localhost", parsed.port or 26379))
            if parsed.path.strip("/"):
                db = int(parsed.path.strip("/"))
            if parsed.password:
                password = unquote(parsed.password)
        if password is not None:
            kwargs.setdefault("password", password)
        if url.startswith("sentinels://"):
            kwargs.setdefault("ssl", True)
        # redis-py types Sentinel from 8.2 on, not before: through an untyped name the
        # type check passes alike on every redis-py pyproject.toml allows.
        make_sentinel: Any = Sentinel
        sentinel = make_sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **kwargs)
        return sentinel.master_for(master_name, db=db, **kwargs)
    if kwargs.pop("cluster", False):
        return RedisCluster.from_url(url, **kwargs)
    return redis.Redis.from_url(url, **kwargs)
