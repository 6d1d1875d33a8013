"""Mistakes a newcomer makes get a message that says what to do."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from starlette_pomo_ws import ConfigurationError, PomoWS
from starlette_pomo_ws.backends import create_backend

from .conftest import make_app, make_settings, make_token


@pytest.mark.parametrize("url", ["reddis://localhost:6379/0", "kafka://broker", "localhost:6379"])
def test_an_unknown_backend_scheme_lists_the_valid_ones(url: str) -> None:
    with pytest.raises(ConfigurationError) as exc:
        create_backend(make_settings(backend_url=url))
    message = str(exc.value)
    assert "backend_url" in message
    assert "memory://" in message and "redis://host:port/db" in message and "rediss://" in message


def test_an_unknown_client_type_lists_the_types_this_server_accepts() -> None:
    with TestClient(make_app(PomoWS(make_settings()))) as client:
        with client.websocket_connect(f"/ws?token={make_token('alice')}") as ws:
            assert ws.receive_json()["type"] == "CONNECTION_ESTABLISHED"
            ws.send_json({"type": "NOTIFICATION", "data": {"message": "hi"}})
            error = ws.receive_json()
    assert error["type"] == "ERROR" and error["data"]["code"] == "unknown_type"
    expected = (
        "Unknown message type 'NOTIFICATION'; this server accepts PING, REFRESH_TOKEN, SUBSCRIBE, UNSUBSCRIBE "
        "and PRESENCE."
    )
    assert error["data"]["message"] == expected
