"""The ``celery reliable`` command group and helpers shared by its commands."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from celery.bin.base import handle_preload_options
from kombu.exceptions import OperationalError

from ..core.config import sanitized_url
from ..core.state import settings_of
from ..core.store import STORE_ERRORS
from ..errors import ConfigurationError

F = TypeVar("F", bound=Callable[..., Any])


@click.group(name="reliable")
@click.pass_context
@handle_preload_options
def reliable(ctx: click.Context, **kwargs: Any) -> None:
    """celery-reliable: dead letters and cluster status."""


def app_of(ctx: click.Context) -> Any:
    """The app given with ``-A``; fail clearly without one (the default app knows nothing)."""
    root = ctx.find_root()
    if not root.params.get("app"):
        raise click.UsageError("give your app: celery -A proj reliable ...")
    app = ctx.obj.app
    import celery_reliable

    celery_reliable.install(app)
    return app


def emit_json(document: Any) -> None:
    """Write one JSON document to stdout."""
    json.dump(document, sys.stdout, indent=2, sort_keys=True, default=repr)
    sys.stdout.write("\n")


def _store_url(ctx: click.Context) -> str:
    try:
        return str(sanitized_url(settings_of(ctx.find_root().obj.app).redis_url))
    except Exception:  # settings unreadable: the error itself says why
        return "reliable_redis_url"


def one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def clear_errors(store: str = "coordination store", broker: str = "") -> Callable[[F], F]:
    """Decorator: a Redis error (or RedisCluster's), a broker error or a bad setting ends
    the command with ONE line on stderr and exit code 1, never a traceback.

    Parameters:
      store: how the message names the store (``dead-letter store at redis://...: ...``).
      broker: appended to a broker error's message (what the user should know then).
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except ConfigurationError as exc:
                raise click.ClickException(one_line(exc)) from None
            except STORE_ERRORS as exc:
                url = _store_url(click.get_current_context())
                raise click.ClickException(f"{store} at {url}: {one_line(exc)}") from None
            except OperationalError as exc:
                raise click.ClickException(
                    f"could not reach the broker: {one_line(exc)}{broker}"
                ) from None

        return run  # type: ignore[return-value]

    return decorate
