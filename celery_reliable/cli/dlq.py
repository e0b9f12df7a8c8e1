"""``celery -A APP reliable dlq list|show|replay|purge``: thin over DeadLetterStore."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from celery.bin.base import CeleryCommand

from ..deadletters.record import DeadLetter
from ..deadletters.store import PAGE_SIZE, DeadLetterStore
from ..errors import DeadLetterNotFound
from .group import app_of, clear_errors, emit_json

#: Entries ``dlq list`` shows when no ``--limit`` is given.
DEFAULT_LIST_LIMIT = 50
#: Characters of the error message shown per row in ``dlq list`` (ellipsis included).
ERROR_COLUMN_WIDTH = 60
#: The mark of a cut error message.
ELLIPSIS = "\u2026"
#: Fields of a dead letter holding Unix seconds, shown as local date-times by ``dlq show``.
TIME_FIELDS = ("failed_at",)


#: What a broker error adds for ``replay``: nothing was lost.
_NOT_REPLAYED = "; entries that were not replayed are still in the store"
_clear_errors = clear_errors("dead-letter store", _NOT_REPLAYED)


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
    """Dead letters, newest first (read and printed a page of 500 at a time)."""
    store = _store(ctx)
    store.trim()
    entries = store.iter_entries(task=task, limit=limit)
    if as_json:
        _stream_json_list(e.to_dict() for e in entries)
        return
    shown = 0
    for e in entries:
        if not shown:
            click.echo(f"{'ID':<38} {'FAILED AT':<19} {'REASON':<16} {'TASK':<30} ERROR")
        shown += 1
        error = cut(
            f"{e.exception}: {e.error}" if e.exception else str(e.error), ERROR_COLUMN_WIDTH
        )
        click.echo(f"{e.id:<38} {_when(e.failed_at):<19} {e.reason:<16} {e.task!s:<30} {error}")
    if not shown:
        click.echo("no dead letters")
        return
    stats = store.stats()
    click.echo(
        f"\n{shown} shown, {stats['count']} stored, "
        f"{stats['dropped']} dropped (capacity), {stats['expired']} expired (ttl)"
    )


def _stream_json_list(items: Iterator[dict[str, Any]]) -> None:
    """Print one JSON list, an item at a time (the same document ``emit_json`` makes)."""
    out = sys.stdout
    first = True
    for item in items:
        text = json.dumps(item, indent=2, sort_keys=True, default=repr)
        out.write(("[\n" if first else ",\n") + "\n".join("  " + ln for ln in text.splitlines()))
        first = False
    out.write("[]\n" if first else "\n]\n")


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


class _Progress:
    """Progress of a long replay or purge, on stderr: click's progress bar on a terminal,
    else one line per :data:`~celery_reliable.deadletters.store.PAGE_SIZE` entries."""

    def __init__(self, verb: str, total: int | None) -> None:
        self.verb = verb
        self.total = total
        self.done = 0
        self._bar: Any = None
        if sys.stderr.isatty():
            self._bar = click.progressbar(length=total, label=verb, file=sys.stderr)
            self._bar.__enter__()

    def advance(self, done: int) -> None:
        before, self.done = self.done, done
        if self._bar is not None:
            self._bar.update(done - before)
        elif done // PAGE_SIZE > before // PAGE_SIZE or done == self.total:
            of = f" of {self.total}" if self.total is not None else ""
            click.echo(f"{self.verb} {done}{of}", err=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@contextmanager
def _interruptible() -> Iterator[Callable[[], bool]]:
    """Ctrl-C (or SIGTERM) asks the operation to stop after the entry in hand, so every
    entry is either done whole or left in the store; a second Ctrl-C stops at once."""
    asked: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def ask(signum: int, frame: Any) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        click.echo("stopping after the entry in hand (Ctrl-C again to stop now)", err=True)

    for sig in previous:
        signal.signal(sig, ask)
    try:
        yield lambda: bool(asked)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    """Re-publish dead letters as new tasks and remove them from the store.

    Each entry is removed right after its own publish, oldest first: an interrupted run
    leaves what it did not replay, and the same command run again continues from there.
    Entries that cannot be replayed faithfully (unknown task, arguments cut, a malformed
    body, a corrupt entry) are refused and kept; the rest are replayed. The exit status is
    1 when any entry was refused.
    """
    _selection(ids, all_, task)
    store = _store(ctx)
    verb = "would replay" if dry_run else "replayed"
    many = all_ or task is not None
    progress = _Progress(verb, store.count() if all_ else None) if many else None
    done: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    count = 0
    try:
        with _interruptible() as stop:
            for r in store.replay_iter(ids, all=all_, task=task, dry_run=dry_run, stop=stop):
                if r.refused is not None:
                    refused.append({"id": r.entry_id, "task": r.task, "reason": r.refused})
                    click.echo(
                        f"refused {r.entry_id} ({r.task or 'no task'}): {r.refused}", err=True
                    )
                    continue
                count += 1
                if as_json:
                    done.append(
                        {
                            "id": r.entry_id,
                            "task": r.task,
                            "new_task_id": r.new_task_id,
                            "sent": r.sent,
                        }
                    )
                elif not many:
                    click.echo(f"{verb} {r.entry_id} -> {r.task}[{r.new_task_id}]")
                if progress is not None:
                    progress.advance(count)
            stopped = stop()
    except DeadLetterNotFound as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if progress is not None:
            progress.close()
    if as_json:
        emit_json(
            {"dry_run": dry_run, "replayed": done, "refused": refused, "interrupted": stopped}
        )
    else:
        left = f"; {store.count()} dead letters left in the store" if many else ""
        click.echo(f"{count} {verb}{left}")
    if stopped:
        raise click.ClickException(
            f"interrupted after {count} {verb}; run the same command again to continue "
            "(nothing replayed is in the store any more, so nothing is replayed twice)"
        )
    if refused:
        click.echo(f"{len(refused)} refused (kept in the store)", err=True)
        ctx.exit(1)


def _confirm(question: str) -> None:
    """Ask on stderr (stdout carries only the result, e.g. the ``--json`` document)."""
    if sys.stdin is None or sys.stdin.closed:
        raise click.ClickException("cannot ask for confirmation (stdin is closed); pass --yes")
    try:
        click.confirm(question, abort=True, err=True)
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(f"cannot ask for confirmation ({exc}); pass --yes") from None


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
    """Delete dead letters (500 per Redis call, oldest first, for --all and --task)."""
    _selection(ids, all_, task)
    store = _store(ctx)
    if not yes:
        what = (
            "ALL dead letters"
            if all_
            else (f"every dead letter of {task}" if task else f"{len(ids)} dead letter(s)")
        )
        _confirm(f"Delete {what}? There is no undo")
    many = all_ or task is not None
    progress = _Progress("purged", store.count() if all_ else None) if many else None
    try:
        with _interruptible() as stop:
            removed = store.purge(
                ids,
                all=all_,
                task=task,
                progress=progress.advance if progress is not None else None,
                stop=stop,
            )
            stopped = stop()
    finally:
        if progress is not None:
            progress.close()
    if as_json:
        emit_json({"purged": removed})
    else:
        click.echo(f"purged {removed}")
    if stopped:
        raise click.ClickException(f"interrupted after {removed} purged")
