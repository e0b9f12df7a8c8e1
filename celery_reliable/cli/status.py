"""``celery -A APP reliable status [--json]``: one view of the cluster's reliability state.

Each feature contributes a section through :func:`celery_reliable.status.register`.
"""

from __future__ import annotations

from typing import Any

import click
from celery.bin.base import CeleryCommand

from ..status import collect
from .group import app_of, clear_errors, emit_json


def _text(value: Any) -> str:
    """One value on one line: ``k=v, k=v`` for a dict, ``-`` for nothing."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items()) or "-"
    return str(value)


@click.command(name="status", cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
@clear_errors()
def status(ctx: click.Context, as_json: bool, **kwargs: Any) -> None:
    """Workers, in-flight counts, breakers, buckets, ordered keys, dead letters."""
    app = app_of(ctx)
    app.loader.import_default_modules()
    report = collect(app)
    if as_json:
        emit_json(report)
        return
    for section, body in report.items():
        click.echo(f"== {section}")
        if isinstance(body, list):
            if not body:
                click.echo("  (none)")
            for row in body:
                click.echo("  " + "  ".join(f"{k}={_text(v)}" for k, v in row.items()))
        elif isinstance(body, dict):
            if not body:
                click.echo("  (none)")
            for k, v in body.items():
                click.echo(f"  {k}: {_text(v)}")
        else:
            click.echo(f"  {body}")
