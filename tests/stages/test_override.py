"""No method override: a `_method` in the query, a form body or a JSON body that InvoisX
(Laravel) would run as another method is refused locally; a mere mention passes.

tests/test_laravel.py proves the same against a real Laravel request object.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import httpx
import pytest

from tests.conftest import Recorder, RunningProxy

Upstream = tuple[Recorder, str]


@pytest.mark.parametrize(
    ("query", "headers", "status"),
    [
        ("?_method=DELETE", {}, 400),
        ("?a=1&.method=DELETE", {}, 400),
        ("?%5Fmethod=DELETE", {}, 400),
        ("?_method[]=DELETE", {}, 400),
        ("", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ("", {"Content-Type": "multipart/form-data; boundary=x"}, 415),
    ],
)
def test_method_override_is_refused(
    proxy: RunningProxy, recorder: Upstream, query: str, headers: dict[str, str], status: int
) -> None:
    response = httpx.post(
        f"{proxy.url}/api/v1/buyers/1{query}", content=b"_method=DELETE", headers=headers
    )
    assert response.status_code == status
    assert response.json()["success"] is False
    assert recorder[0].requests == []


def test_queries_that_merely_mention_method_pass(proxy: RunningProxy, recorder: Upstream) -> None:
    response = httpx.get(f"{proxy.url}/api/v1/invoices", params={"payment_method": "card"})
    assert response.status_code == 200
    assert recorder[0].requests[-1].query_string == b"payment_method=card"


def _curl(*args: str) -> tuple[int, dict[str, Any]]:
    """Run the real curl binary; the status and JSON body it received."""
    result = subprocess.run(
        # No proxy from the environment: the test talks to the loopback proxy itself.
        [
            "curl",
            "--noproxy",
            "*",
            "--silent",
            "--show-error",
            "--write-out",
            "\n%{http_code}",
            *args,
        ],
        capture_output=True,
        check=True,
        text=True,
        timeout=30,
    )
    body, _, status = result.stdout.rpartition("\n")
    return int(status), json.loads(body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl command")
def test_curl_d_without_a_json_type_is_told_how_to_send_json(
    proxy: RunningProxy, recorder: Upstream
) -> None:
    url = f"{proxy.url}/api/v1/buyers"
    payload = '{"name": "Acme Sdn Bhd"}'
    # curl -d sends application/x-www-form-urlencoded unless told otherwise.
    assert _curl("-d", payload, url) == (
        415,
        {
            "success": False,
            "message": "Form bodies are not forwarded: the InvoisX API takes JSON. Send the body "
            "with Content-Type: application/json (with curl: -H 'Content-Type: "
            "application/json', or --json instead of -d).",
            "error_code": "UNSUPPORTED_MEDIA_TYPE",
        },
    )
    assert recorder[0].requests == []
    # Both ways the hint names go through.
    assert _curl("-d", payload, "-H", "Content-Type: application/json", url)[0] == 200
    if "--json" in subprocess.run(["curl", "--help", "all"], capture_output=True, text=True).stdout:
        assert _curl("--json", payload, url)[0] == 200  # curl 7.82 and later
    assert {request.body for request in recorder[0].requests} == {payload.encode()}
    assert {request.header("content-type")[0] for request in recorder[0].requests} == {
        "application/json"
    }
