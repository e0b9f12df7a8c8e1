"""The ``celery reliable`` command group and helpers shared by its commands."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from celery.bin.base import handle_preload_options


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
