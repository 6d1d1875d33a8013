"""Resume with `last_event_id`: every missed event exactly once, or RESYNC_REQUIRED and no partial replay."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient, WebSocketTestSession

from starlette_pomo_ws import PomoWS
from starlette_pomo_ws.backends import memory

from .conftest import make_app, make_settings, make_token


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(make_app(PomoWS(make_settings(history_size=5)))) as client:
        yield client


def publish(client: TestClient, type_: str, user: str | None = None, data: Any = None) -> str:
    response = client.post("/publish", json={"user": user, "type": type_, "data": data})
    assert response.status_code == 200
    event_id: str = response.json()["id"]
    return event_id


def connect(client: TestClient, user: str = "u1", cursor: str | None = None) -> Any:
    query = f"?token={make_token(user)}"
    if cursor is not None:
        query += f"&last_event_id={cursor}"
    return client.websocket_connect("/ws" + query)


def ping_marker(ws: WebSocketTestSession) -> list[dict[str, Any]]:
    """Everything the server sent before the answer to a PING: proves nothing else is queued."""
    ws.send_json({"type": "PING"})
    seen = []
    while (message := ws.receive_json())["type"] != "PONG":
        seen.append(message)
    return seen


def test_a_reconnecting_client_gets_what_it_missed_in_order_exactly_once(client: TestClient) -> None:
    with connect(client) as ws:
        hello = ws.receive_json()
        first = publish(client, "TASK_CREATED", "u1", {"n": 1})
        assert ws.receive_json()["id"] == first
    missed = [
        publish(client, "TASK_UPDATED", "u1", {"n": 2}),
        publish(client, "NOTIFICATION", None, {"n": 3}),
        publish(client, "TASK_UPDATED", "u2", {"not": "mine"}),
        publish(client, "TASK_DELETED", "u1", {"n": 4}),
    ]
    with connect(client, cursor=first) as ws:
        established = ws.receive_json()
        assert established["type"] == "CONNECTION_ESTABLISHED"
        assert established["data"]["resumed"] is True
        replay = [ws.receive_json() for _ in range(3)]
        assert [m["id"] for m in replay] == [missed[0], missed[1], missed[3]]
        assert [m["data"] for m in replay] == [{"n": 2}, {"n": 3}, {"n": 4}]
        live = publish(client, "TASK_CREATED", "u1", {"n": 5})
        assert [m["id"] for m in ping_marker(ws)] == [live]
        assert hello["id"] != established["id"]


def test_replay_then_live_has_no_gap_and_no_duplicate(client: TestClient) -> None:
    with connect(client) as ws:
        cursor = ws.receive_json()["id"]
    ids = [publish(client, "TASK_CREATED", "u1", {"n": n}) for n in range(3)]
    with connect(client, cursor=cursor) as ws:
        assert ws.receive_json()["type"] == "CONNECTION_ESTABLISHED"
        ids.append(publish(client, "TASK_CREATED", "u1", {"n": 3}))
        got = [message["id"] for message in ping_marker(ws)]
        assert got == ids


def test_the_established_id_is_a_cursor_even_before_any_event(client: TestClient) -> None:
    with connect(client) as ws:
        cursor = ws.receive_json()["id"]
    event = publish(client, "TASK_CREATED", "u1")
    with connect(client, cursor=cursor) as ws:
        established = ws.receive_json()
        assert established["data"]["resumed"] is True
        assert established["id"] == cursor, "a resumed connection starts at its resume point"
        assert [m["id"] for m in ping_marker(ws)] == [event]


def test_an_idle_client_resumes_cleanly_although_others_overflowed_history(client: TestClient) -> None:
    with connect(client) as ws:
        cursor = ws.receive_json()["id"]
    for n in range(20):  # history_size is 5: another user's stream is trimmed many times over
        publish(client, "TASK_CREATED", "someone-else", {"n": n})
    with connect(client, cursor=cursor) as ws:
        assert ws.receive_json()["data"]["resumed"] is True
        assert ping_marker(ws) == []


def test_a_cursor_older_than_the_window_gets_resync_and_no_partial_replay(client: TestClient) -> None:
    with connect(client) as ws:
        cursor = ws.receive_json()["id"]
    for n in range(6):  # one more than history_size
        publish(client, "TASK_CREATED", "u1", {"n": n})
    current = publish(client, "NOTIFICATION", None)
    assert_resync(client, cursor, "u1", expected_position=current)


def test_broadcasts_older_than_the_window_also_force_resync(client: TestClient) -> None:
    with connect(client) as ws:
        cursor = ws.receive_json()["id"]
    for n in range(6):
        publish(client, "NOTIFICATION", None, {"n": n})
    assert_resync(client, cursor, "u1")


def test_events_older_than_history_ttl_force_resync() -> None:
    now = [1000.0]
    backend = memory.MemoryBackend(history_ttl=60, clock=lambda: now[0])
    with TestClient(make_app(PomoWS(make_settings(), backend=backend))) as client:
        with connect(client) as ws:
            cursor = ws.receive_json()["id"]
        publish(client, "TASK_CREATED", "u1")
        now[0] += 30
        with connect(client, cursor=cursor) as ws:  # still inside the window
            assert ws.receive_json()["data"]["resumed"] is True
            assert [m["type"] for m in ping_marker(ws)] == ["TASK_CREATED"]
        now[0] += 31
        assert_resync(client, cursor, "u1")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),
        lambda c: c.split(".")[0] + ".ff." + c.split(".")[2],
        lambda c: "garbage",
        lambda c: "a.b.c",
        lambda c: "x" * 300,
        lambda c: "",
    ],
    ids=["bad-signature", "other-seq", "garbage", "three-parts", "oversized", "empty"],
)
def test_tampered_cursors_get_resync(client: TestClient, mangle: Any) -> None:
    publish(client, "TASK_CREATED", "u1")
    with connect(client) as ws:
        cursor = ws.receive_json()["id"]
    publish(client, "TASK_CREATED", "u1")
    bad = mangle(cursor)
    if bad == "":
        with connect(client, cursor=bad) as ws:  # an empty cursor is a fresh connection
            assert ws.receive_json()["data"]["resumed"] is False
            assert ping_marker(ws) == []
        return
    assert_resync(client, bad, "u1")


def test_another_users_event_id_is_refused_but_a_broadcast_id_is_valid_for_all(client: TestClient) -> None:
    theirs = publish(client, "TASK_CREATED", "u2", {"secret": True})
    assert_resync(client, theirs, "u1")
    everyone = publish(client, "NOTIFICATION", None)
    mine = publish(client, "TASK_CREATED", "u1")
    with connect(client, cursor=everyone) as ws:
        assert ws.receive_json()["data"]["resumed"] is True
        assert [m["id"] for m in ping_marker(ws)] == [mine]


def test_a_restart_starts_a_new_epoch_and_old_cursors_get_resync() -> None:
    with TestClient(make_app(PomoWS(make_settings()))) as client:
        with connect(client) as ws:
            cursor = ws.receive_json()["id"]
    with TestClient(make_app(PomoWS(make_settings()))) as client:
        assert_resync(client, cursor, "u1")


def test_resume_reruns_authentication(client: TestClient) -> None:
    with connect(client) as ws:
        cursor = ws.receive_json()["id"]
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as exc:
        with client.websocket_connect(f"/ws?token=forged&last_event_id={cursor}") as ws:
            ws.receive_json()
    assert exc.value.code == 1008


def test_resync_position_is_a_cursor_from_which_live_events_continue(client: TestClient) -> None:
    with connect(client, cursor="garbage") as ws:
        ws.receive_json()
        resync = ws.receive_json()
        assert resync["type"] == "RESYNC_REQUIRED"
    event = publish(client, "TASK_CREATED", "u1")
    with connect(client, cursor=resync["id"]) as ws:
        assert ws.receive_json()["data"]["resumed"] is True
        assert [m["id"] for m in ping_marker(ws)] == [event]


def assert_resync(client: TestClient, cursor: str, user: str, expected_position: str | None = None) -> None:
    with connect(client, user, cursor=cursor) as ws:
        established = ws.receive_json()
        assert established["type"] == "CONNECTION_ESTABLISHED"
        assert established["data"]["resumed"] is False
        resync = ws.receive_json()
        assert resync["type"] == "RESYNC_REQUIRED"
        assert resync["userId"] == user
        assert "id" in resync
        if expected_position is not None:
            assert resync["id"].split(".")[:2] == expected_position.split(".")[:2]
        assert ping_marker(ws) == [], "no partial replay after RESYNC_REQUIRED"
