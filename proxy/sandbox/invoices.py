"""Invoice endpoints and the document lifecycle draft -> ready -> valid -> cancelled."""

from __future__ import annotations

import secrets
import string
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal

from starlette.requests import Request
from starlette.responses import Response

from proxy.sandbox.errors import SandboxError, document_not_found
from proxy.sandbox.responses import no_content, success
from proxy.sandbox.store import Record, SandboxStore, new_id, paginate, timestamp
from proxy.sandbox.validation import (
    LineInput,
    parse_paging,
    parse_status,
    read_json_object,
    validate_invoice,
)

__all__ = [
    "cancel_invoice",
    "create_invoice",
    "delete_invoice",
    "get_invoice",
    "invoice_status",
    "list_invoices",
    "submit_invoice",
    "update_invoice",
    "validate_invoice_action",
]

_MALAYSIA = timezone(timedelta(hours=8), "MYT")
_CENT = Decimal("0.01")
_LHDN_ALPHABET = string.ascii_uppercase + string.digits


async def list_invoices(request: Request, store: SandboxStore) -> Response:
    """GET /invoices: filter by `status`; `search` matches invoice number or buyer name."""
    page, per_page = parse_paging(request.query_params)
    status = parse_status(request.query_params)
    search = request.query_params.get("search", "").strip().lower()
    invoices = [
        invoice
        for invoice in store.invoices.values()
        if (status is None or invoice["status"] == status)
        and (
            not search
            or search in invoice["invoiceNumber"].lower()
            or search in invoice["buyer"]["name"].lower()
        )
    ]
    data, meta = paginate(invoices, page, per_page)
    return success(data, meta=meta)


async def create_invoice(request: Request, store: SandboxStore) -> Response:
    """POST /invoices: 201 with a `draft` invoice and its computed totals."""
    fields = validate_invoice(await read_json_object(request), store.buyers)
    now = timestamp()
    invoice: Record = {
        "id": new_id(),
        "invoiceNumber": fields["invoiceNumber"] or store.next_invoice_number(),
        "status": "draft",
        **_content(fields, store),
        "issueDate": fields["issueDate"] or datetime.now(_MALAYSIA).date().isoformat(),
        "uuid": None,
        "longId": None,
        "submittedAt": None,
        "cancelledAt": None,
        "created_at": now,
        "updated_at": now,
    }
    store.invoices[invoice["id"]] = invoice
    return success(invoice, 201)


async def get_invoice(request: Request, store: SandboxStore) -> Response:
    """GET /invoices/{id}."""
    return success(_find(request, store))


async def update_invoice(request: Request, store: SandboxStore) -> Response:
    """PUT /invoices/{id}: full update of a draft; an omitted number or date is kept."""
    invoice = _require_draft(_find(request, store), "modified")
    fields = validate_invoice(await read_json_object(request), store.buyers)
    invoice.update(_content(fields, store), updated_at=timestamp())
    invoice["invoiceNumber"] = fields["invoiceNumber"] or invoice["invoiceNumber"]
    invoice["issueDate"] = fields["issueDate"] or invoice["issueDate"]
    return success(invoice)


async def delete_invoice(request: Request, store: SandboxStore) -> Response:
    """DELETE /invoices/{id}: 204 for a draft, 403 DOCUMENT_READ_ONLY otherwise."""
    invoice = _find(request, store)
    if invoice["status"] != "draft":
        raise SandboxError(
            403, "DOCUMENT_READ_ONLY", "This document is read-only and cannot be deleted."
        )
    del store.invoices[invoice["id"]]
    return no_content()


async def validate_invoice_action(request: Request, store: SandboxStore) -> Response:
    """POST /invoices/{id}/validate: draft -> ready."""
    invoice = _require_draft(_find(request, store), "validated")
    return success(_transition(invoice, "ready"))


async def submit_invoice(request: Request, store: SandboxStore) -> Response:
    """POST /invoices/{id}/submit: ready -> valid, with LHDN's uuid and longId."""
    invoice = _find(request, store)
    if invoice["status"] != "ready":
        raise SandboxError(
            422, "DOCUMENT_NOT_READY", "The document must be validated before submission."
        )
    now = timestamp()
    invoice.update(uuid=_lhdn_code(26), longId=_lhdn_code(46), submittedAt=now)
    return success(_transition(invoice, "valid", now))


async def cancel_invoice(request: Request, store: SandboxStore) -> Response:
    """POST /invoices/{id}/cancel: valid -> cancelled."""
    invoice = _find(request, store)
    if invoice["status"] != "valid":
        raise SandboxError(422, "DOCUMENT_NOT_VALID", "Only valid documents can be cancelled.")
    now = timestamp()
    invoice["cancelledAt"] = now
    return success(_transition(invoice, "cancelled", now))


async def invoice_status(request: Request, store: SandboxStore) -> Response:
    """GET /invoices/{id}/status: the lifecycle fields only."""
    invoice = _find(request, store)
    keys = ("id", "invoiceNumber", "status", "uuid", "longId", "submittedAt", "cancelledAt")
    return success({key: invoice[key] for key in keys})


def _find(request: Request, store: SandboxStore) -> Record:
    invoice = store.invoices.get(request.path_params["invoice_id"])
    if invoice is None:
        raise document_not_found("Invoice")
    return invoice


def _require_draft(invoice: Record, action: str) -> Record:
    if invoice["status"] != "draft":
        raise SandboxError(403, "DOCUMENT_NOT_DRAFT", f"Only draft documents can be {action}.")
    return invoice


def _transition(invoice: Record, status: str, now: str | None = None) -> Record:
    invoice["status"] = status
    invoice["updated_at"] = now or timestamp()
    return invoice


def _content(fields: Record, store: SandboxStore) -> Record:
    """Buyer snapshot, currency, priced lines and totals from validated fields."""
    buyer = store.buyers[fields["buyerId"]]
    lines = [_priced_line(number, line) for number, line in enumerate(fields["invoiceLines"], 1)]
    subtotal = sum((line[1] for line in lines), Decimal(0))
    tax = sum((line[2] for line in lines), Decimal(0))
    return {
        "buyerId": buyer["id"],
        "buyer": {"id": buyer["id"], "name": buyer["name"], "tin": buyer["tin"]},
        "currency": fields["currency"],
        "invoiceLines": [line[0] for line in lines],
        "subtotal": _number(subtotal),
        "taxAmount": _number(tax),
        "totalAmount": _number(subtotal + tax),
    }


def _priced_line(number: int, line: LineInput) -> tuple[Record, Decimal, Decimal]:
    subtotal = (line.quantity * line.unit_price).quantize(_CENT, ROUND_HALF_UP)
    tax = (subtotal * line.tax_rate / 100).quantize(_CENT, ROUND_HALF_UP)
    record = {
        "lineNumber": number,
        "description": line.description,
        "quantity": _number(line.quantity),
        "unitPrice": _number(line.unit_price),
        "taxRate": _number(line.tax_rate),
        "subtotal": _number(subtotal),
        "taxAmount": _number(tax),
        "total": _number(subtotal + tax),
    }
    return record, subtotal, tax


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def _lhdn_code(length: int) -> str:
    return "".join(secrets.choice(_LHDN_ALPHABET) for _ in range(length))
