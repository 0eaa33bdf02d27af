"""The app's own endpoints and the envelope on every proxy-made error."""

from __future__ import annotations

import httpx

from tests.conftest import Recorder, RunningProxy


def test_healthz_never_touches_upstream(
    proxy: RunningProxy, recorder: tuple[Recorder, str]
) -> None:
    response = httpx.get(f"{proxy.url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert recorder[0].requests == []


def test_paths_outside_the_api_are_404_envelopes(
    proxy: RunningProxy, recorder: tuple[Recorder, str]
) -> None:
    for path in ("/", "/api/v1", "/api/v2/buyers", "/metrics.php", "/healthz/x"):
        response = httpx.post(f"{proxy.url}{path}")
        assert response.status_code == 404, path
        assert response.json() == {
            "success": False,
            "message": "Only /api/v1/ paths are served by this proxy.",
            "error_code": "NOT_FOUND",
        }
        assert response.headers["x-request-id"]
    assert recorder[0].requests == []
    assert {line["decision"] for line in proxy.audit_lines(at_least=5)} == {"invalid"}
