"""Buyer endpoints: list (search, paging), create, fetch, full update, delete."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from proxy.sandbox.errors import document_not_found
from proxy.sandbox.responses import no_content, success
from proxy.sandbox.store import Record, SandboxStore, new_id, paginate, timestamp
from proxy.sandbox.validation import parse_paging, read_json_object, validate_buyer

__all__ = ["create_buyer", "delete_buyer", "get_buyer", "list_buyers", "update_buyer"]


async def list_buyers(request: Request, store: SandboxStore) -> Response:
    """GET /buyers: `search` matches name or TIN, case-insensitively."""
    page, per_page = parse_paging(request.query_params)
    buyers = list(store.buyers.values())
    search = request.query_params.get("search", "").strip().lower()
    if search:
        buyers = [b for b in buyers if search in b["name"].lower() or search in b["tin"].lower()]
    data, meta = paginate(buyers, page, per_page)
    return success(data, meta=meta)


async def create_buyer(request: Request, store: SandboxStore) -> Response:
    """POST /buyers: 201 with the stored buyer."""
    fields = validate_buyer(await read_json_object(request))
    now = timestamp()
    buyer = {"id": new_id(), **fields, "created_at": now, "updated_at": now}
    store.buyers[buyer["id"]] = buyer
    return success(buyer, 201)


async def get_buyer(request: Request, store: SandboxStore) -> Response:
    """GET /buyers/{id}."""
    return success(_find(request, store))


async def update_buyer(request: Request, store: SandboxStore) -> Response:
    """PUT /buyers/{id}: a full update, validated like a create."""
    buyer = _find(request, store)
    fields = validate_buyer(await read_json_object(request))
    buyer.update(fields, updated_at=timestamp())
    return success(buyer)


async def delete_buyer(request: Request, store: SandboxStore) -> Response:
    """DELETE /buyers/{id}: 204."""
    del store.buyers[_find(request, store)["id"]]
    return no_content()


def _find(request: Request, store: SandboxStore) -> Record:
    buyer = store.buyers.get(request.path_params["buyer_id"])
    if buyer is None:
        raise document_not_found("Buyer")
    return buyer
