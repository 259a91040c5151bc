"""How the CLI shows things: Rich tables for people, JSON with ``--json`` for programs."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

console = Console()
errors = Console(stderr=True)


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    if hasattr(value, "value"):
        return str(value.value)
    return str(value)


def show_list(items: Sequence[BaseModel], columns: Sequence[str], *, title: str, as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps([item.model_dump(mode="json") for item in items]))
        return
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column.replace("_", " "), overflow="fold")
    for item in items:
        table.add_row(*(_cell(getattr(item, column)) for column in columns))
    console.print(table)
    if not items:
        console.print("[dim](none)[/dim]")


def show_one(item: BaseModel, *, title: str, as_json: bool, hide: Sequence[str] = ()) -> None:
    if as_json:
        console.print_json(item.model_dump_json())
        return
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in item:
        if name not in hide:
            table.add_row(name.replace("_", " "), _cell(value))
    console.print(table)
