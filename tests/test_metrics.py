from __future__ import annotations

import re

import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from starlette_pomo_ws import PomoWS

from .conftest import make_app, make_settings, make_token


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{labels} missing from:\n{text}"
    return float(match.group(1))


def test_metrics_endpoint_counts_the_lifecycle() -> None:
    pomo = PomoWS(make_settings(metrics=True))
    with TestClient(make_app(pomo)) as client:
        with client.websocket_connect(f"/ws?token={make_token('a')}") as ws:
            cursor = ws.receive_json()["id"]
            client.post("/publish", json={"user": "a", "type": "TASK_CREATED", "data": {"n": 1}})
            ws.receive_json()
            text = client.get("/ws/metrics").text
            assert metric(text, "pomo_ws_connections") == 1
            assert metric(text, "pomo_ws_users") == 1
        with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws?token=bad") as ws:
            ws.receive_json()
        client.post("/publish", json={"type": "NOTIFICATION"})
        with client.websocket_connect(f"/ws?token={make_token('a')}&last_event_id={cursor}") as ws:
            for _ in range(3):
                ws.receive_json()
        with client.websocket_connect(f"/ws?token={make_token('a')}&last_event_id=forged") as ws:
            ws.receive_json()
        response = client.get("/ws/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        assert metric(text, "pomo_ws_connections") == 0
        assert metric(text, "pomo_ws_connections_accepted_total") == 3
        assert metric(text, "pomo_ws_handshakes_rejected_total", '{reason="auth"}') == 1
        assert metric(text, "pomo_ws_disconnects_total", '{code="1000"}') >= 1
        assert metric(text, "pomo_ws_resumes_total", '{result="ok"}') == 1
        assert metric(text, "pomo_ws_resumes_total", '{result="resync"}') == 1
        assert metric(text, "pomo_ws_replayed_events_total") == 2
        assert metric(text, "pomo_ws_messages_sent_total") >= 5
        assert metric(text, "pomo_ws_sent_bytes_total") > 100
        assert metric(text, "pomo_ws_broadcast_duration_seconds_count") == 2
        assert metric(text, "pomo_ws_backend_connected") == 1


def test_metrics_are_opt_in_and_can_be_mounted_elsewhere() -> None:
    pomo = PomoWS(make_settings())
    app = make_app(pomo)
    app.mount("/internal/metrics", pomo.metrics_app)
    with TestClient(app) as client:
        assert client.get("/ws/metrics").status_code == 404
        assert "pomo_ws_connections 0.0" in client.get("/internal/metrics/").text


def test_the_collector_joins_a_global_registry() -> None:
    pomo = PomoWS(make_settings())
    REGISTRY.register(pomo.metrics_collector)
    try:
        assert REGISTRY.get_sample_value("pomo_ws_connections") == 0
    finally:
        REGISTRY.unregister(pomo.metrics_collector)


def test_sent_bytes_count_utf8_bytes_once_per_delivery() -> None:
    """A fan-out to two tabs counts the event twice, in bytes of UTF-8 (not characters)."""
    pomo = PomoWS(make_settings(metrics=True))
    with TestClient(make_app(pomo)) as client:
        with (
            client.websocket_connect(f"/ws?token={make_token('a')}") as tab1,
            client.websocket_connect(f"/ws?token={make_token('a')}") as tab2,
        ):
            tab1.receive_json()
            tab2.receive_json()
            before = client.get("/ws/metrics").text
            client.post("/publish", json={"user": "a", "type": "NOTE", "data": {"text": "café ☕"}})
            texts = [tab1.receive_text(), tab2.receive_text()]
            after = client.get("/ws/metrics").text
    assert texts[0] == texts[1]
    assert metric(after, "pomo_ws_messages_sent_total") - metric(before, "pomo_ws_messages_sent_total") == 2
    sent = metric(after, "pomo_ws_sent_bytes_total") - metric(before, "pomo_ws_sent_bytes_total")
    assert sent == 2 * len(texts[0].encode()) != 2 * len(texts[0])
