"""The demo tour: a scripted walk through the proxy, as an internal app without a token."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import httpx

from proxy.report import audit_options, run_audit

__all__ = ["curl_lines", "print_tour_report", "run_tour"]

BUYER = {"name": "Syarikat Contoh Sdn Bhd", "tin": "C2584563200"}
LINE = {"description": "E-invoicing consultancy", "quantity": 2, "unitPrice": 150}
_PRINT_ID = 'python3 -c \'import json,sys; print(json.load(sys.stdin)["data"]["id"])\''


def curl_lines(api_url: str) -> list[str]:
    """Paste-ready shell lines that try the proxy by hand; none carries a token."""
    send_json = "curl -s -H 'Content-Type: application/json'"
    invoice = json.dumps({"buyerId": "$BUYER", "invoiceLines": [LINE]}).replace('"', '\\"')
    return [
        f"API={api_url}",
        "curl -s $API/buyers",
        f"BUYER=$({send_json} -d '{json.dumps(BUYER)}' $API/buyers | {_PRINT_ID})",
        f'INVOICE=$({send_json} -d "{invoice}" $API/invoices | {_PRINT_ID})',
        "curl -s -X POST $API/invoices/$INVOICE/validate",
        "curl -s -X POST $API/invoices/$INVOICE/submit",
        "curl -s -X DELETE $API/buyers/$BUYER   # refused by the proxy: no delete permission",
    ]


class _Tour:
    """Prints one line per step and counts the steps that did not behave as expected."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.steps = 0
        self.failures = 0

    def say(self, text: str) -> None:
        print(text, file=self.out)

    def step(self, response: httpx.Response, expected: int, summary: str) -> dict[str, Any]:
        self.steps += 1
        body = response.json() if "json" in response.headers.get("content-type", "") else {}
        passed = response.status_code == expected
        request = f"{response.request.method} {response.request.url.path}"
        self.say(
            f"  {'ok  ' if passed else 'FAIL'} {summary:<44} {response.status_code}  {request}"
        )
        if not passed:
            self.failures += 1
            self.say(f"{'':7}expected {expected}: {body.get('message', response.text[:100])}")
        data: dict[str, Any] = body.get("data") or body
        return data


def _lines_since(audit_path: Path, start: int) -> bytes:
    # A kept log may hold earlier runs; the tour reports on its own lines only.
    with audit_path.open("rb") as log:
        log.seek(start)
        return log.read()


def _audit_summary(audit_path: Path, start: int, token: str) -> tuple[bool, str]:
    text = _lines_since(audit_path, start).decode("utf-8")
    lines = [json.loads(line) for line in text.splitlines()]
    decisions = Counter(line["decision"] for line in lines if line["event"] == "request")
    counts = ", ".join(f"{count} {name}" for name, count in sorted(decisions.items()))
    leaked = token in text
    return not leaked, f"audit log: {counts}; the token appears {'IN IT' if leaked else 'nowhere'}"


def run_tour(
    proxy_url: str, sandbox_url: str, audit_path: Path, token: str, out: TextIO, *, start: int = 0
) -> bool:
    """Walk through the proxy, one printed line a step; True when every step went as expected.

    The proxy's audit lines for the tour are those of `audit_path` from byte `start` on."""
    tour = _Tour(out)
    tour.say(f"Tour: every call below goes to {proxy_url}/api/v1 and carries no token.")
    with httpx.Client(base_url=f"{proxy_url}/api/v1", timeout=10) as api:
        tour.step(api.get("/buyers"), 200, "list buyers")
        buyer = tour.step(api.post("/buyers", json=BUYER), 201, "create a buyer").get("id")
        errors = tour.step(
            api.post("/buyers", json={"name": ""}), 422, "a buyer without name or tin"
        ).get("errors", {})
        tour.say(f"{'':7}InvoisX's own validation errors pass through: {', '.join(errors)}")
        draft = {"buyerId": buyer, "invoiceLines": [LINE]}
        invoice = tour.step(api.post("/invoices", json=draft), 201, "create a draft invoice")
        path = f"/invoices/{invoice.get('id')}"
        tour.step(api.post(f"{path}/validate"), 200, "validate it: draft -> ready")
        tour.step(api.post(f"{path}/submit"), 200, "submit it: ready -> valid")
        refusal = tour.step(api.delete(f"/buyers/{buyer}"), 403, "refused by the proxy")
        tour.say(f"{'':7}needs '{refusal.get('required_permission')}'; InvoisX was not called")
        tour.step(api.get(f"/buyers/{buyer}"), 200, "so the buyer is still there")
    with httpx.Client(timeout=10) as direct:
        # What the proxy spares its clients: without Accept, Laravel answers with a redirect.
        bare = direct.get(f"{sandbox_url}/buyers")
        tour.step(bare, 302, "InvoisX without the proxy: a redirect")
    clean, summary = _audit_summary(audit_path, start, token)
    tour.failures += not clean
    tour.say(f"  {'ok  ' if clean else 'FAIL'} {summary}")
    passed = tour.failures == 0
    tour.say(f"Tour {'passed' if passed else 'FAILED'}: {tour.steps} calls, "
             f"{tour.failures} not as expected.")  # fmt: skip
    return passed


def print_tour_report(audit_path: Path, start: int, out: TextIO) -> None:
    """Print `invoisx-proxy audit`'s report on the tour's lines (`audit_path` from `start`)."""
    print("\nWhat `invoisx-proxy audit LOG` reports on the tour's calls:\n", file=out, flush=True)
    own_lines = io.BytesIO(_lines_since(audit_path, start))
    run_audit([], audit_options(), stdin=own_lines, stdout=out)
