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
    outside = "Only paths below /api/v1/ are served by this proxy, for example /api/v1/buyers."
    no_resource = "The path names no resource: add one after /api/v1/, for example /api/v1/buyers."
    expected = {
        "/": outside,
        "/api/v2/buyers": outside,
        "/metrics.php": outside,
        "/healthz/x": outside,
        "/api/v1": no_resource,
        "/api/v1/": no_resource,
    }
    for path, message in expected.items():
        response = httpx.post(f"{proxy.url}{path}")
        assert response.status_code == 404, path
        assert response.json() == {"success": False, "message": message, "error_code": "NOT_FOUND"}
        assert response.headers["x-request-id"]
    assert recorder[0].requests == []
    assert {line["decision"] for line in proxy.audit_lines(at_least=6)} == {"invalid"}
