"""The sandbox's in-memory data: buyers and invoices as JSON-ready dicts, plus paging."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["Record", "SandboxStore", "new_id", "paginate", "timestamp"]

Record = dict[str, Any]


@dataclass
class SandboxStore:
    """All sandbox data, kept in insertion order; lists are returned oldest first."""

    buyers: dict[str, Record] = field(default_factory=dict)
    invoices: dict[str, Record] = field(default_factory=dict)
    invoice_sequence: int = 0

    def next_invoice_number(self) -> str:
        """The next auto-generated invoice number, INV-000001 onwards."""
        self.invoice_sequence += 1
        return f"INV-{self.invoice_sequence:06d}"


def new_id() -> str:
    """A fresh resource id (UUID4 string)."""
    return str(uuid.uuid4())


def timestamp() -> str:
    """Now, serialised the way Laravel serialises model timestamps."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def paginate(items: Sequence[Record], page: int, per_page: int) -> tuple[list[Record], Record]:
    """One page of `items` and its `meta` block (last_page is at least 1)."""
    start = (page - 1) * per_page
    meta = {
        "current_page": page,
        "per_page": per_page,
        "total": len(items),
        "last_page": max(math.ceil(len(items) / per_page), 1),
    }
    return list(items[start : start + per_page]), meta
