"""The ``grace-hooks`` command group and what its commands share: the library's errors shown as
``error: <message>`` (exit code 2, no traceback), a line on stderr for long work, loading a model
with its packs, and a plain table."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from ..errors import GraceHooksError

DEFAULT_ADAPTERS = "adapters"


class _Group(click.Group):
    """Turns the library's own errors into ``error: ...`` and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GraceHooksError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


def busy(message: str) -> None:
    """A line on stderr so a person knows long work is under way."""
    click.echo(message, err=True)


def load_model(model: str, adapters: Path | None = None, skip: str | None = None):
    """Load ``model`` with the packs of ``adapters`` (oldest first), leaving out pack ``skip``."""
    from ..model import EditableModel

    t0 = time.perf_counter()
    busy(f"loading model {model} ...")
    em = EditableModel.from_pretrained(model)
    try:
        if adapters is not None:
            em.load_adapters(adapters, exclude=[skip] if skip else ())
    except BaseException:
        em.close()
        raise
    packs = [p.name for p in em.packs]
    busy(f"loaded in {time.perf_counter() - t0:.1f} s" + (f" with {len(packs)} pack(s): {', '.join(packs)}" if packs else ""))
    return em


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True,
              help="Log lines with their level and source, and third-party warnings and progress bars.")
def main(verbose: bool) -> None:
    """Non-destructive knowledge editing of Hugging Face LMs with edit packs."""
    from . import logs

    logs.setup(verbose)


def print_table(rows: list[list[str]], indent: str = "") -> None:
    """Columns padded to their widest cell; the last column is left ragged (it may be long)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])

