"""Store topologies, the pure part: ``reliable_redis_url`` for one server, Redis Cluster and
Sentinel is parsed and validated at install, a sentinel:// broker is followed, and a Redis
broker that cannot serve as the store is an error naming the setting, never a fallback.
(The real cluster and Sentinel runs are tests/test_cluster.py and tests/test_sentinel.py.)"""

from __future__ import annotations

import pytest
from celery import Celery

from celery_reliable import ConfigurationError, Settings
from celery_reliable.core.config import DEFAULT_REDIS_URL, parse_store_url


def settings(broker: str = "redis://127.0.0.1:1/3", env: dict[str, str] | None = None, **conf):
    app = Celery("topology-test", broker=broker, set_as_current=False)
    app.conf.update(conf)
    return Settings.from_app(app, environ=env or {})


def test_cluster_url_names_its_seed_nodes_credentials_and_tls():
    a = parse_store_url("redis+cluster://:s%40cret@10.0.0.1:7000,10.0.0.2:7001/")
    assert a.kind == "cluster" and a.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert a.password == "s@cret" and a.username is None and not a.ssl
    tls = parse_store_url("rediss+cluster://app:pw@node-a:7000")
    assert tls.ssl and tls.username == "app" and tls.nodes == (("node-a", 7000),)
    assert parse_store_url("redis+cluster://node-a").nodes == (("node-a", 6379),)
    s = settings(reliable_redis_url="redis+cluster://127.0.0.1:7000,127.0.0.1:7001/")
    assert s.store_address.kind == "cluster"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster:///", "at least one HOST:PORT"),
        ("redis+cluster://h:notaport/", "bad HOST:PORT"),
        ("redis+cluster://h:7000/2", "only database 0"),
        ("redis+cluster://h:7000/?ssl_cert_reqs=none", "query options"),
        ("http://h:7000/", "expected a redis://"),
        ("sentinel://h:26379;redis://h:6379", "starts with sentinel://"),
    ],
)
def test_bad_store_urls_fail_naming_the_setting(url, problem):
    with pytest.raises(ConfigurationError, match=problem) as err:
        settings(reliable_redis_url=url)
    assert "reliable_redis_url" in str(err.value)


def test_sentinel_url_needs_a_master_name_and_the_name_needs_sentinel():
    url = "sentinel://:pw@10.0.0.1:26379/2;sentinel://10.0.0.2"
    s = settings(reliable_redis_url=url, reliable_redis_sentinel_master="mymaster")
    a = s.store_address
    assert a.kind == "sentinel" and a.db == 2 and a.password == "pw"
    assert a.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    assert s.redis_sentinel_master == "mymaster"
    with pytest.raises(ConfigurationError, match=r"reliable_redis_sentinel_master.*required"):
        settings(reliable_redis_url=url)
    with pytest.raises(ConfigurationError, match="only used with a sentinel://"):
        settings(reliable_redis_sentinel_master="mymaster")
    env = {
        "CELERY_RELIABLE_REDIS_URL": url,
        "CELERY_RELIABLE_REDIS_SENTINEL_MASTER": "from-env",
    }
    assert settings(env=env).redis_sentinel_master == "from-env"


def test_a_sentinel_broker_is_followed_with_its_master_name():
    broker = "sentinel://127.0.0.1:26379/1;sentinel://127.0.0.1:26380/1"
    app = Celery("follow", broker=broker, set_as_current=False)
    app.conf.broker_transport_options = {"master_name": "events"}
    s = Settings.from_app(app, environ={})
    assert s.redis_url == broker and s.redis_sentinel_master == "events"
    assert s.store_address.db == 1
    # an explicit master name wins over the broker's
    app.conf.reliable_redis_sentinel_master = "coordination"
    assert Settings.from_app(app, environ={}).redis_sentinel_master == "coordination"


@pytest.mark.parametrize(
    ("broker", "options"),
    [
        ("sentinel://127.0.0.1:26379", {}),  # no master_name to follow
        ("redis+socket:///run/redis.sock", {}),  # kombu's socket syntax
        ("socket:///run/redis.sock", {}),
    ],
)
def test_a_redis_broker_that_cannot_be_the_store_is_an_error_not_a_fallback(broker, options):
    app = Celery("nofallback", broker=broker, set_as_current=False)
    app.conf.broker_transport_options = options
    with pytest.raises(ConfigurationError, match="reliable_redis_url") as err:
        Settings.from_app(app, environ={})
    assert DEFAULT_REDIS_URL not in str(err.value)
    app.conf.reliable_redis_url = "unix:///run/redis.sock?db=1"
    assert Settings.from_app(app, environ={}).redis_url == "unix:///run/redis.sock?db=1"


def test_the_store_url_follows_a_plain_redis_broker_and_defaults_for_amqp():
    assert settings().redis_url == "redis://127.0.0.1:1/3"
    assert settings("redis://a:6379/0;redis://b:6379/0").redis_url == "redis://a:6379/0"
    assert settings("amqp://guest@127.0.0.1//").redis_url == DEFAULT_REDIS_URL
