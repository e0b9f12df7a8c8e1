"""``celery -A APP reliable dlq list|show|replay|purge``: thin over DeadLetterStore."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
import redis
from celery.bin.base import CeleryCommand
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from ..deadletters.record import DeadLetter
from ..deadletters.store import DeadLetterStore
from ..errors import DeadLetterNotFound, UnknownTaskError
from .group import app_of, emit_json

#: Entries ``dlq list`` shows when no ``--limit`` is given.
DEFAULT_LIST_LIMIT = 50
#: Characters of the error message shown per row in ``dlq list`` (ellipsis included).
ERROR_COLUMN_WIDTH = 60
#: The mark of a cut error message.
ELLIPSIS = "\u2026"
#: Fields of a dead letter holding Unix seconds, shown as local date-times by ``dlq show``.
TIME_FIELDS = ("failed_at",)


F = TypeVar("F", bound=Callable[..., Any])


def _clear_errors(command: F) -> F:
    """Turn Redis and broker errors into one line on stderr and exit code 1."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except redis.RedisError as exc:
            ctx = click.get_current_context()
            url = maybe_sanitize_url(_store(ctx).settings.redis_url)
            raise click.ClickException(f"dead-letter store at {url}: {exc}") from None
        except OperationalError as exc:
            raise click.ClickException(
                f"could not publish to the broker: {exc}; "
                "entries that were not replayed are still in the store"
            ) from None

    return run  # type: ignore[return-value]


@click.group(name="dlq")
def dlq() -> None:
    """Dead letters: list, show, replay, purge."""


def _store(ctx: click.Context) -> DeadLetterStore:
    return DeadLetterStore(app_of(ctx))


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def cut(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters: cut at the last word boundary
    (when one is in the second half) and marked with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    head = text[: width - 1]
    space = head.rfind(" ")
    if space > width // 2:
        head = head[:space]
    return head.rstrip(" ,.;:") + ELLIPSIS


def _selection(ids: tuple[str, ...], all_: bool, task: str | None) -> None:
    given = sum((bool(ids), all_, task is not None))
    if given != 1:
        raise click.UsageError("give dead-letter IDs, or --all, or --task NAME (exactly one)")


@dlq.command(name="list", cls=CeleryCommand)
@click.option("--task", default=None, help="Only dead letters of this task name.")
@click.option("--limit", default=DEFAULT_LIST_LIMIT, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list.")
@click.pass_context
@_clear_errors
def list_(ctx: click.Context, task: str | None, limit: int, as_json: bool, **kwargs: Any) -> None:
    """Dead letters, newest first."""
    store = _store(ctx)
    entries = store.list(task=task, limit=limit)
    if as_json:
        emit_json([e.to_dict() for e in entries])
        return
    if not entries:
        click.echo("no dead letters")
        return
    click.echo(f"{'ID':<38} {'FAILED AT':<19} {'REASON':<16} {'TASK':<30} ERROR")
    for e in entries:
        error = cut(f"{e.exception}: {e.error}", ERROR_COLUMN_WIDTH)
        click.echo(f"{e.id:<38} {_when(e.failed_at):<19} {e.reason:<16} {e.task!s:<30} {error}")
    stats = store.stats()
    click.echo(
        f"\n{len(entries)} shown, {stats['count']} stored, "
        f"{stats['dropped']} dropped (capacity), {stats['expired']} expired (ttl)"
    )


def _show_text(e: DeadLetter) -> None:
    for name, value in e.to_dict().items():
        if name == "traceback":
            continue
        if name in TIME_FIELDS and isinstance(value, (int, float)):
            value = f"{_when(value)} ({time.strftime('%Z')}; {value!r})"
        click.echo(f"{name + ':':<15} {value}")
    if e.traceback:
        click.echo("traceback:")
        click.echo(e.traceback.rstrip())


@dlq.command(name="show", cls=CeleryCommand)
@click.argument("entry_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
@_clear_errors
def show(ctx: click.Context, entry_id: str, as_json: bool, **kwargs: Any) -> None:
    """One dead letter, whole."""
    try:
        entry = _store(ctx).get(entry_id)
    except DeadLetterNotFound as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        emit_json(entry.to_dict())
    else:
        _show_text(entry)


@dlq.command(name="replay", cls=CeleryCommand)
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Replay every dead letter.")
@click.option("--task", default=None, help="Replay every dead letter of this task.")
@click.option("--dry-run", is_flag=True, help="Say what would be replayed; send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
@_clear_errors
def replay(
    ctx: click.Context,
    ids: tuple[str, ...],
    all_: bool,
    task: str | None,
    dry_run: bool,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Re-publish dead letters as new tasks and remove them from the store."""
    _selection(ids, all_, task)
    try:
        done = _store(ctx).replay(ids, all=all_, task=task, dry_run=dry_run)
    except (DeadLetterNotFound, UnknownTaskError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        emit_json(
            {
                "dry_run": dry_run,
                "replayed": [
                    {"id": r.entry_id, "task": r.task, "new_task_id": r.new_task_id, "sent": r.sent}
                    for r in done
                ],
            }
        )
        return
    verb = "would replay" if dry_run else "replayed"
    for r in done:
        click.echo(f"{verb} {r.entry_id} -> {r.task}[{r.new_task_id}]")
    click.echo(f"{len(done)} {verb}")


@dlq.command(name="purge", cls=CeleryCommand)
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Delete every dead letter.")
@click.option("--task", default=None, help="Delete every dead letter of this task.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
@_clear_errors
def purge(
    ctx: click.Context,
    ids: tuple[str, ...],
    all_: bool,
    task: str | None,
    yes: bool,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Delete dead letters."""
    _selection(ids, all_, task)
    store = _store(ctx)
    if not yes:
        what = (
            "ALL dead letters"
            if all_
            else (f"every dead letter of {task}" if task else f"{len(ids)} dead letter(s)")
        )
        click.confirm(f"Delete {what}? There is no undo", abort=True)
    removed = store.purge(ids, all=all_, task=task)
    if as_json:
        emit_json({"purged": removed})
    else:
        click.echo(f"purged {removed}")
