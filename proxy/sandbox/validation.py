"""Request parsing and validation with Laravel's rules and messages.

Strings are trimmed and empty strings count as missing (Laravel's TrimStrings and
ConvertEmptyStringsToNull middleware). Each field reports its first failing rule only. Field
names in messages are shown the Laravel way: `invoiceLines.0.unitPrice` -> "invoice lines.0.unit
price".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import date
from decimal import Decimal
from typing import Any, NamedTuple

from starlette.datastructures import QueryParams
from starlette.requests import Request

from proxy.sandbox.errors import FieldErrors, validation_failed
from proxy.sandbox.store import Record

__all__ = [
    "ID_TYPES",
    "INVOICE_STATUSES",
    "LineInput",
    "parse_paging",
    "parse_status",
    "read_json_object",
    "validate_buyer",
    "validate_invoice",
]

ID_TYPES = ("BRN", "NRIC", "PASSPORT", "ARMY")
INVOICE_STATUSES = ("draft", "ready", "valid", "cancelled")
_TIN = re.compile(r"(?:C|IG|SG|OG|D|E|F|FA|PT|TA|TC|TN|TR|TP|J|LE)\d{9,11}|EI000000000[1-4]0")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_INTEGER = re.compile(r"[+-]?\d{1,9}")
_NUMERIC = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_CAMEL_HUMP = re.compile(r"(?<=.)(?=[A-Z])")
_MAX_AMOUNT = Decimal("999999999999.99")
_DEFAULT_PER_PAGE = 15
_MAX_PER_PAGE = 100


class LineInput(NamedTuple):
    """One validated invoice line."""

    description: str
    quantity: Decimal
    unit_price: Decimal
    tax_rate: Decimal


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or 422 VALIDATION_FAILED with an error on `body`."""
    # Laravel only parses a body declared as JSON; anything else reads as an empty form.
    if "json" not in request.headers.get("content-type", "").lower():
        raise validation_failed({"body": ["The request body must be JSON (application/json)."]})
    try:
        data = json.loads(await request.body(), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise validation_failed({"body": ["The request body must be valid JSON."]}) from None
    if not isinstance(data, dict):
        raise validation_failed({"body": ["The request body must be a JSON object."]})
    return data


def parse_paging(query: QueryParams) -> tuple[int, int]:
    """`page` (default 1) and `per_page` (default 15, 1..100) from the query string."""
    errors: FieldErrors = {}
    page = _integer(errors, "page", query.get("page"), 1, None)
    per_page = _integer(errors, "per_page", query.get("per_page"), 1, _MAX_PER_PAGE)
    if errors:
        raise validation_failed(errors)
    return page or 1, per_page or _DEFAULT_PER_PAGE


def parse_status(query: QueryParams) -> str | None:
    """The optional `status` filter of the invoice list."""
    errors: FieldErrors = {}
    status = _choice(errors, "status", query.get("status"), INVOICE_STATUSES)
    if errors:
        raise validation_failed(errors)
    return status


def validate_buyer(data: Mapping[str, Any]) -> Record:
    """The buyer fields of a create or full update (absent optional fields become null)."""
    errors: FieldErrors = {}
    fields: Record = {
        "name": _string(errors, "name", data.get("name"), required=True, max_length=255),
        "tin": _string(errors, "tin", data.get("tin"), required=True, max_length=20, pattern=_TIN),
        "id_type": _choice(errors, "id_type", data.get("id_type"), ID_TYPES),
        "id_value": _string(errors, "id_value", data.get("id_value"), max_length=255),
        "email": _string(
            errors,
            "email",
            data.get("email"),
            max_length=255,
            pattern=_EMAIL,
            mismatch="The {attr} field must be a valid email address.",
        ),
        "phone": _string(errors, "phone", data.get("phone"), max_length=20),
        "address": _object(errors, "address", data.get("address")),
        "contact": _object(errors, "contact", data.get("contact")),
    }
    if errors:
        raise validation_failed(errors)
    return fields


def validate_invoice(data: Mapping[str, Any], buyers: Mapping[str, Record]) -> Record:
    """The invoice fields of a create or full update; `buyerId` must name a stored buyer.

    Returns `buyerId`, `invoiceNumber` and `issueDate` (None when omitted), `currency` and
    `invoiceLines` (a list of LineInput).
    """
    errors: FieldErrors = {}
    buyer_id = _string(errors, "buyerId", data.get("buyerId"), required=True, max_length=64)
    if buyer_id is not None and buyer_id not in buyers:
        _fail(errors, "buyerId", "The selected {attr} is invalid.")
    currency = _string(errors, "currency", data.get("currency"), max_length=3, pattern=_CURRENCY)
    fields: Record = {
        "buyerId": buyer_id,
        "invoiceNumber": _string(errors, "invoiceNumber", data.get("invoiceNumber"), max_length=50),
        "issueDate": _date(errors, "issueDate", data.get("issueDate")),
        "currency": currency or "MYR",
        "invoiceLines": _lines(errors, data.get("invoiceLines")),
    }
    if errors:
        raise validation_failed(errors)
    return fields


def _lines(errors: FieldErrors, value: Any) -> list[LineInput]:
    if value is None or value == []:
        _fail(errors, "invoiceLines", "The {attr} field is required.")
        return []
    if not isinstance(value, list):
        _fail(errors, "invoiceLines", "The {attr} field must be an array.")
        return []
    lines: list[LineInput] = []
    for index, line in enumerate(value):
        key = f"invoiceLines.{index}"
        if not isinstance(line, dict):
            _fail(errors, key, "The {attr} field must be an array.")
            continue
        description = _string(
            errors, f"{key}.description", line.get("description"), required=True, max_length=500
        )
        quantity = _number(errors, f"{key}.quantity", line.get("quantity"), required=True, gt=0)
        unit_price = _number(errors, f"{key}.unitPrice", line.get("unitPrice"), required=True)
        tax_rate = _number(errors, f"{key}.taxRate", line.get("taxRate"), maximum=Decimal(100))
        if description is not None and quantity is not None and unit_price is not None:
            lines.append(LineInput(description, quantity, unit_price, tax_rate or Decimal(0)))
    return lines


def _display(key: str) -> str:
    return _CAMEL_HUMP.sub("_", key).lower().replace("_", " ")


def _fail(errors: FieldErrors, key: str, template: str, **values: object) -> None:
    errors.setdefault(key, []).append(template.format(attr=_display(key), **values))


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def _string(
    errors: FieldErrors,
    key: str,
    value: Any,
    *,
    required: bool = False,
    max_length: int,
    pattern: re.Pattern[str] | None = None,
    mismatch: str = "The {attr} field format is invalid.",
) -> str | None:
    value = _clean(value)
    if value is None:
        if required:
            _fail(errors, key, "The {attr} field is required.")
        return None
    if not isinstance(value, str):
        _fail(errors, key, "The {attr} field must be a string.")
    elif len(value) > max_length:
        _fail(
            errors,
            key,
            "The {attr} field must not be greater than {max} characters.",
            max=max_length,
        )
    elif pattern is not None and not pattern.fullmatch(value):
        _fail(errors, key, mismatch)
    else:
        return value
    return None


def _choice(errors: FieldErrors, key: str, value: Any, choices: tuple[str, ...]) -> str | None:
    value = _clean(value)
    if value is None:
        return None
    if value not in choices:
        _fail(errors, key, "The selected {attr} is invalid.")
        return None
    return str(value)


def _object(errors: FieldErrors, key: str, value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    _fail(errors, key, "The {attr} field must be an array.")
    return None


def _date(errors: FieldErrors, key: str, value: Any) -> str | None:
    value = _clean(value)
    if value is None:
        return None
    if isinstance(value, str) and _ISO_DATE.fullmatch(value):
        try:
            return date.fromisoformat(value).isoformat()
        except ValueError:
            pass
    _fail(errors, key, "The {attr} field must match the format Y-m-d.")
    return None


def _integer(
    errors: FieldErrors, key: str, value: str | None, minimum: int, maximum: int | None
) -> int | None:
    value = _clean(value)
    if value is None:
        return None
    if not _INTEGER.fullmatch(value):
        _fail(errors, key, "The {attr} field must be an integer.")
    elif int(value) < minimum:
        _fail(errors, key, "The {attr} field must be at least {min}.", min=minimum)
    elif maximum is not None and int(value) > maximum:
        _fail(errors, key, "The {attr} field must not be greater than {max}.", max=maximum)
    else:
        return int(value)
    return None


def _number(
    errors: FieldErrors,
    key: str,
    value: Any,
    *,
    required: bool = False,
    gt: Decimal | int | None = None,
    maximum: Decimal = _MAX_AMOUNT,
) -> Decimal | None:
    value = _clean(value)
    if value is None:
        if required:
            _fail(errors, key, "The {attr} field is required.")
        return None
    number = _as_decimal(value)
    if number is None:
        _fail(errors, key, "The {attr} field must be a number.")
    elif gt is not None and number <= gt:
        _fail(errors, key, "The {attr} field must be greater than {value}.", value=gt)
    elif number < 0:
        _fail(errors, key, "The {attr} field must be at least 0.")
    elif number > maximum:
        _fail(errors, key, "The {attr} field must not be greater than {max}.", max=maximum)
    else:
        return number
    return None


def _as_decimal(value: Any) -> Decimal | None:
    # bool is an int in Python but not a number to Laravel's `numeric` rule.
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMERIC.fullmatch(value)):
        number = Decimal(str(value))
        return number if number.is_finite() else None
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
