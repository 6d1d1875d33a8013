"""Property tests: adversarial client frames, handshakes (query strings, subprotocols, headers), cursors and JWTs.

These drive the ASGI app directly, with a scripted `receive` and a recording `send`, so that every example is
cheap and the exact message sequence can be asserted. Real sockets are covered by `tests/e2e` and the other
test modules. Each example starts its own app and checks that tasks and the registry return to their baseline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, MutableMapping, Sequence
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings, strategies as st
from starlette.datastructures import QueryParams

from starlette_pomo_ws import PomoWS, Settings
from starlette_pomo_ws._events import CursorSigner
from starlette_pomo_ws.testing import PomoWebSocket

from .conftest import SECRET, make_settings, make_token, wait_until

pytestmark = pytest.mark.anyio

Message = MutableMapping[str, Any]

NO_TOKEN = "No authentication token provided"
INVALID = "Invalid authentication token"
EXPIRED = "Authentication token expired"
MAX_SIZE = 512

fuzz_settings = settings(
    max_examples=60,
    deadline=None,
    database=None,  # keep the repository clean; failures are reproduced from the printed example
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- an ASGI-level client --------------------------------------------------------------------------------


class FakeSocket:
    """One WebSocket at the ASGI level: the test kit's `PomoWebSocket`, read message by message.

    Like a server, it answers the app's close frame with `websocket.disconnect`, and it records any message
    the app sends after its close (a protocol violation). `yielding=True` makes every send switch tasks once.
    """

    def __init__(
        self,
        app: PomoWS,
        *,
        query: bytes | str = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
        subprotocols: Sequence[str] = (),
        yielding: bool = False,
    ) -> None:
        self.ws = PomoWebSocket(
            app,
            "/",
            query,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
            subprotocols,
            send_mode="yield" if yielding else "instant",
        )

    @property
    def scope(self) -> MutableMapping[str, Any]:
        return self.ws.scope

    async def __aenter__(self) -> FakeSocket:
        self.ws.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self.ws.closed:
            self.ws.feed({"type": "websocket.disconnect", "code": 1000})
        await self.ws.finished(timeout=5)  # re-raises a crash of the app
        assert self.ws.violations == [], f"the app sent after its close: {self.ws.violations}"

    def send_text(self, text: str) -> None:
        self.ws.feed({"type": "websocket.receive", "text": text})

    def send_bytes(self, data: bytes) -> None:
        self.ws.feed({"type": "websocket.receive", "bytes": data})

    async def next(self, within: float = 3) -> Message:
        """The app's next ASGI message; fails if the app returns or crashes without one."""
        return await self.ws.receive_message(timeout=within)

    async def accepted(self) -> str | None:
        message = await self.next()
        assert message["type"] == "websocket.accept", message
        subprotocol: str | None = message.get("subprotocol")
        return subprotocol

    async def json(self) -> dict[str, Any]:
        message = await self.next()
        assert message["type"] == "websocket.send", message
        assert "text" in message and message.get("bytes") is None, "server messages are text frames"
        result: dict[str, Any] = json.loads(message["text"])
        return result

    async def close_frame(self) -> tuple[int, str]:
        message = await self.next()
        assert message["type"] == "websocket.close", message
        return message["code"], message.get("reason", "")

    async def refusal(self) -> tuple[int, str]:
        """A refused handshake: accepted (so that the client sees the code), then closed at once."""
        await self.accepted()
        return await self.close_frame()

    async def established(self) -> dict[str, Any]:
        await self.accepted()
        hello = await self.json()
        assert hello["type"] == "CONNECTION_ESTABLISHED", hello
        assert isinstance(hello.get("id"), str)
        return hello

    async def ping_pong(self) -> None:
        """Alive, and nothing else was waiting: the next message after a PING is its PONG."""
        self.send_text('{"type": "PING"}')
        pong = await self.json()
        assert pong["type"] == "PONG", pong


@contextlib.asynccontextmanager
async def started(config: Settings | None = None) -> AsyncIterator[PomoWS]:
    """A started app; on exit, no connection is left and the number of tasks is back to its baseline."""
    baseline = len(asyncio.all_tasks())
    pomo = PomoWS(config or make_settings(client_message_rate=10_000, client_message_burst=10_000))
    async with pomo.lifespan():
        yield pomo
        await wait_until(lambda: pomo.broadcaster.total_connection_count() == 0, 3, "the registry to empty")
        assert pomo.broadcaster.backed_up == {}
        assert len(pomo.broadcaster._subscriptions) == 0
    await wait_until(lambda: len(asyncio.all_tasks()) == baseline, 3, "asyncio tasks back to their baseline")


def token_query(token: str, **params: str) -> str:
    return urllib.parse.urlencode({"token": token, **params})


# -- client frames ---------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
message_types = st.sampled_from(
    ["PING", "PONG", "REFRESH_TOKEN", "ERROR", "HEARTBEAT", "CONNECTION_ESTABLISHED", "TASK_CREATED", "ping", ""]
) | st.text(max_size=16)
objects = st.fixed_dictionaries(
    {}, optional={"type": message_types | json_values, "data": json_values, "id": json_values}
).map(json.dumps)
refresh_attempts = st.builds(
    lambda token, junk: json.dumps({"type": "REFRESH_TOKEN", "data": {"token": token, **junk}}),
    st.text(max_size=64) | st.sampled_from([make_token("u1", ttl=-60), "a.b.c", "e30.e30.e30"]),
    st.dictionaries(st.text(max_size=4), json_scalars, max_size=2),
)
frames: st.SearchStrategy[str | bytes] = st.one_of(
    objects,
    refresh_attempts,
    json_values.map(json.dumps),
    objects.map(lambda text: text[: len(text) // 2]),  # truncated JSON
    st.text(max_size=64),
    st.text(max_size=MAX_SIZE + 64),  # around max_message_size, in characters and in UTF-8 bytes
    st.binary(max_size=64),
    st.binary(min_size=MAX_SIZE - 4, max_size=MAX_SIZE + 4),
)


def expected_answer(frame: str | bytes) -> tuple[str, str]:
    """The documented outcome of one client frame: ("ERROR", code), ("PONG", ""), or ("close", "1009")."""
    if isinstance(frame, bytes):
        return ("close", "1009") if len(frame) > MAX_SIZE else ("ERROR", "binary_not_supported")
    if len(frame.encode()) > MAX_SIZE:
        return ("close", "1009")
    try:
        payload = json.loads(frame)
    except (ValueError, RecursionError):
        return ("ERROR", "invalid_json")
    if not isinstance(payload, dict):
        return ("ERROR", "not_an_object")
    type_ = payload.get("type")
    if not isinstance(type_, str) or not type_:
        return ("ERROR", "missing_type")
    if type_ == "PING":
        return ("PONG", "")
    if type_ == "REFRESH_TOKEN":
        return ("ERROR", "invalid_token")  # no fuzzed token is valid
    return ("ERROR", "unknown_type")


@fuzz_settings
@given(batch=st.lists(frames, min_size=1, max_size=8), yielding=st.booleans())
async def test_client_frames_get_exactly_their_documented_answer(batch: list[str | bytes], yielding: bool) -> None:
    async with started(make_settings(max_message_size=MAX_SIZE, client_message_burst=10_000)) as pomo:
        async with (
            FakeSocket(pomo, query=token_query(make_token("control"))) as control,
            FakeSocket(pomo, query=token_query(make_token("u1")), yielding=yielding) as ws,
        ):
            await control.established()
            await ws.established()
            for frame in batch:
                if isinstance(frame, bytes):
                    ws.send_bytes(frame)
                else:
                    ws.send_text(frame)
                kind, detail = expected_answer(frame)
                if kind == "close":
                    assert await ws.close_frame() == (1009, "Message too big")
                    break
                answer = await ws.json()
                assert answer["type"] == kind, (frame, answer)
                assert answer["userId"] == "u1"
                assert "id" not in answer
                if kind == "ERROR":
                    assert answer["data"]["code"] == detail, (frame, answer)
            else:
                await ws.ping_pong()
                assert pomo.broadcaster.user_connection_count("u1") == 1
            await control.ping_pong()
            event = await pomo.broadcaster.broadcast_to_all("NOTIFICATION", {"n": 1})
            assert (await control.json())["id"] == event.id


# -- handshakes: query strings, subprotocols, headers ----------------------------------------------------

query_bytes = st.binary(max_size=200) | st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass"))
protocol_names = st.text(
    alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=40
)
not_bearer = protocol_names.filter(lambda name: name.lower() != "bearer")


@fuzz_settings
@given(query_bytes)
async def test_a_random_query_string_is_refused_with_its_documented_reason(query: bytes) -> None:
    async with started() as pomo, FakeSocket(pomo, query=query) as ws:
        token = QueryParams(query.decode("latin-1")).get("token")
        assert await ws.refusal() == (1008, INVALID if token else NO_TOKEN)
        assert pomo.broadcaster.total_connection_count() == 0


@fuzz_settings
@given(query_bytes)
async def test_random_query_parameters_next_to_a_valid_token_change_nothing_but_last_event_id(query: bytes) -> None:
    full = query + b"&" + token_query(make_token("u1")).encode()
    async with started() as pomo, FakeSocket(pomo, query=full) as ws:
        hello = await ws.established()
        assert hello["userId"] == "u1"
        if QueryParams(full.decode("latin-1")).get("last_event_id"):
            # A random cursor is never valid: resync, never a partial replay.
            resync = await ws.json()
            assert resync["type"] == "RESYNC_REQUIRED"
            assert hello["data"]["resumed"] is False
        await ws.ping_pong()


@fuzz_settings
@given(
    before=st.lists(not_bearer, max_size=4),
    after=st.lists(not_bearer, max_size=4),
    pair=st.sampled_from(["valid", "garbage", "lone", "none"]),
    query_token=st.booleans(),
)
async def test_subprotocol_offers_select_bearer_only_when_offered_and_never_echo_the_token(
    before: list[str], after: list[str], pair: str, query_token: bool
) -> None:
    token = make_token("u1")
    offered = list(before)
    if pair == "valid":
        offered += ["bearer", token]
    elif pair == "garbage":
        offered += ["bearer", "not.a.jwt"]
    elif pair == "lone":
        offered += ["bearer"]
    offered += [] if pair == "lone" else after
    query = token_query(make_token("u1")) if query_token else ""
    async with started() as pomo, FakeSocket(pomo, query=query, subprotocols=offered) as ws:
        subprotocol = await ws.accepted()
        assert subprotocol in (None, *offered), "a server may only select an offered subprotocol"
        assert subprotocol == ("bearer" if pair != "none" else None)
        if pair == "valid" or (pair in ("lone", "none") and query_token):
            hello = await ws.json()
            assert hello["type"] == "CONNECTION_ESTABLISHED"
            assert token not in json.dumps(hello)
            await ws.ping_pong()
        else:
            # The subprotocol token wins over the query; a lone "bearer" carries none.
            reason = INVALID if pair == "garbage" else NO_TOKEN
            assert await ws.close_frame() == (1008, reason)


@pytest.mark.parametrize("spelling", ["Bearer", "BEARER"])
async def test_the_selected_subprotocol_is_spelled_as_the_client_offered_it(spelling: str) -> None:
    """RFC 6455 4.1: a client fails the handshake when the server selects a subprotocol it did not offer."""
    async with started() as pomo, FakeSocket(pomo, subprotocols=[spelling, make_token("u1")]) as ws:
        assert await ws.accepted() == spelling
        assert (await ws.json())["type"] == "CONNECTION_ESTABLISHED"


header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=30).filter(
    lambda name: name not in ("authorization", "origin", "cookie", "host", "sec-websocket-protocol")
)


@fuzz_settings
@given(
    junk=st.lists(st.tuples(header_names, st.binary(max_size=64)), max_size=6),
    huge=st.integers(min_value=0, max_value=256 * 1024),
    cookie=st.binary(max_size=200),
)
async def test_junk_and_huge_headers_do_not_disturb_a_valid_handshake(
    junk: list[tuple[str, bytes]], huge: int, cookie: bytes
) -> None:
    headers = [(name.encode(), value) for name, value in junk]
    headers += [(b"x-huge", b"h" * huge), (b"cookie", cookie)]
    async with started() as pomo, FakeSocket(pomo, query=token_query(make_token("u1")), headers=headers) as ws:
        assert (await ws.established())["userId"] == "u1"
        await ws.ping_pong()


@fuzz_settings
@given(attempts=st.integers(min_value=1, max_value=12), limit=st.integers(min_value=1, max_value=5))
async def test_concurrent_handshakes_of_one_user_never_exceed_max_connections_per_user(
    attempts: int, limit: int
) -> None:
    """Handshakes that arrive together are counted like ones that arrive in turn."""
    config = make_settings(max_connections_per_user=limit)
    async with started(config) as pomo, contextlib.AsyncExitStack() as stack:
        sockets = [
            await stack.enter_async_context(FakeSocket(pomo, query=token_query(make_token("u1")), yielding=True))
            for _ in range(attempts)
        ]
        outcomes: list[object] = []
        for ws in sockets:
            await ws.accepted()
            message = await ws.next()
            if message["type"] == "websocket.close":
                outcomes.append((message["code"], message.get("reason")))
            else:
                outcomes.append(json.loads(message["text"])["type"])
        admitted = min(attempts, limit)
        assert outcomes.count("CONNECTION_ESTABLISHED") == admitted, outcomes
        assert outcomes.count((1008, "Too many connections for this user")) == attempts - admitted, outcomes
        assert pomo.broadcaster.user_connection_count("u1") == admitted


# -- cursors ---------------------------------------------------------------------------------------------

CURSOR_ALPHABET = "0123456789abcdefABCDEF-_.="


@fuzz_settings
@given(st.data())
async def test_bad_cursors_get_resync_right_after_connection_established_and_never_a_replay(
    data: st.DataObject,
) -> None:
    async with started() as pomo:
        broadcaster = pomo.broadcaster
        async with FakeSocket(pomo, query=token_query(make_token("u2"))) as other:
            others_hello = await other.established()
        mine = [
            (await broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"n": 1})).id,
            (await broadcaster.broadcast_to_all("NOTIFICATION", {"n": 2})).id,
        ]
        theirs = [(await broadcaster.broadcast_to_user("u2", "TASK_CREATED", {"secret": 3})).id, others_hello["id"]]
        await broadcaster.broadcast_to_user("u1", "TASK_UPDATED", {"n": 4})
        epoch, seq_hex, _ = mine[0].split(".")
        key = make_settings().derived_cursor_key(shared=False)
        signer = CursorSigner(key)
        forger = CursorSigner(hashlib.sha256(b"not the key").digest())
        valid = data.draw(st.sampled_from(mine), label="valid cursor to tamper with")
        # Draw independently of the random epoch and signatures, so that Hypothesis can replay an example.
        index = data.draw(st.integers(min_value=0, max_value=200), label="index") % len(valid)
        replacement = data.draw(st.sampled_from(CURSOR_ALPHABET), label="char")
        if replacement == valid[index]:
            replacement = CURSOR_ALPHABET[(CURSOR_ALPHABET.index(replacement) + 1) % len(CURSOR_ALPHABET)]
        cursor = data.draw(
            st.one_of(
                st.text(min_size=1, max_size=80),
                st.text(alphabet=CURSOR_ALPHABET, min_size=1, max_size=80),
                st.just(valid[:index] + replacement + valid[index + 1 :]),  # tampered
                st.just(valid + "0"),
                st.sampled_from(theirs),  # another user's events and position
                st.builds(lambda seq: forger.sign(epoch, seq, "u1"), st.integers(0, 10)),  # signed with another key
                st.builds(lambda seq: signer.sign(epoch, seq, "u1"), st.integers(100, 2**40)),  # a future position
                st.builds(lambda seq: signer.sign("0ld3p0ch", seq, "u1"), st.integers(0, 10)),  # a lost history
                st.just(signer.sign(epoch, int(seq_hex, 16), "u1") + "x" * 300),
            ),
            label="cursor",
        )
        assert cursor not in mine
        async with FakeSocket(pomo, query=token_query(make_token("u1"), last_event_id=cursor)) as ws:
            hello = await ws.established()
            assert hello["data"]["resumed"] is False
            resync = await ws.json()
            assert resync["type"] == "RESYNC_REQUIRED", resync
            assert resync["userId"] == "u1"
            await ws.ping_pong()  # nothing was replayed
            live = await broadcaster.broadcast_to_user("u1", "TASK_DELETED", {"n": 5})
            assert (await ws.json())["id"] == live.id
        # RESYNC_REQUIRED's id is the current position: resuming from it replays exactly what came after.
        async with FakeSocket(pomo, query=token_query(make_token("u1"), last_event_id=resync["id"])) as ws:
            hello = await ws.established()
            assert hello["data"]["resumed"] is True
            replayed = await ws.json()
            assert (replayed["type"], replayed["id"]) == ("TASK_DELETED", live.id)
            await ws.ping_pong()


# -- JWTs ------------------------------------------------------------------------------------------------


@functools.cache
def rsa_keys() -> tuple[Any, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public_pem


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    """An HS256 JWT signed by hand, with any key (PyJWT refuses to use a PEM key as an HMAC secret)."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    return signing_input + "." + b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


def unsigned(payload: dict[str, Any]) -> str:
    """An `alg=none` token, as PyJWT writes it."""
    return jwt.encode(payload, None, algorithm="none")  # type: ignore[arg-type]


def claims(user: Any = "u1", ttl: float = 300, **extra: Any) -> dict[str, Any]:
    return {"userId": user, "exp": int(time.time() + ttl), **extra}


bad_hs256_tokens = st.one_of(
    st.builds(lambda c: (unsigned(c), INVALID), st.builds(claims)),  # alg=none
    st.builds(lambda c: (hand_signed({"alg": "none", "typ": "JWT"}, c, b""), INVALID), st.builds(claims)),
    st.builds(lambda c: (jwt.encode(c, SECRET + "x", algorithm="HS256"), INVALID), st.builds(claims)),
    st.builds(lambda c: (jwt.encode(c, SECRET * 2, algorithm="HS512"), INVALID), st.builds(claims)),
    st.builds(lambda c: (jwt.encode(c, SECRET, algorithm="HS256"), EXPIRED), st.builds(claims, ttl=st.just(-60))),
    st.builds(
        lambda user: (jwt.encode(claims(user), SECRET, algorithm="HS256"), INVALID),
        st.sampled_from([None, "", True, False, [1], {"a": 1}, 1.5]),
    ),  # no usable userId claim
    st.builds(lambda: (jwt.encode({"userId": "u1"}, SECRET, algorithm="HS256"), INVALID)),  # no exp
    st.builds(  # oversized, though correctly signed
        lambda pad: (jwt.encode(claims(pad="p" * pad), SECRET, algorithm="HS256"), INVALID),
        st.integers(min_value=6200, max_value=60_000),
    ),
    st.builds(lambda text: (text, INVALID), st.text(alphabet="abcXYZ0189-_.~", min_size=1, max_size=300)),  # garbage
    st.builds(  # a valid token with one character changed
        lambda index: (_flip(make_token("u1"), index), INVALID),
        st.integers(min_value=0, max_value=150),
    ),
)


def _flip(token: str, index: int) -> str:
    # Never the last character: its two low bits are padding that base64 decoding ignores.
    index %= len(token) - 1
    if token[index] == ".":
        index -= 1
    return token[:index] + ("A" if token[index] != "A" else "B") + token[index + 1 :]


def placements(token: str) -> dict[str, dict[str, Any]]:
    return {
        "query": {"query": token_query(token)},
        "subprotocol": {"subprotocols": ["bearer", token]},
        "authorization": {"headers": [(b"authorization", b"Bearer " + token.encode())]},
    }


@fuzz_settings
@given(case=bad_hs256_tokens, placement=st.sampled_from(["query", "subprotocol", "authorization"]))
async def test_bad_jwts_are_refused_with_exactly_their_reason(case: tuple[str, str], placement: str) -> None:
    token, reason = case
    async with started() as pomo:
        async with FakeSocket(pomo, query=token_query(make_token("control"))) as control:
            await control.established()
            async with FakeSocket(pomo, **placements(token)[placement]) as ws:
                assert await ws.refusal() == (1008, reason)
            await control.ping_pong()


@fuzz_settings
@given(
    raw=st.binary(min_size=1, max_size=300).filter(lambda value: b"\xff" in value or not value.isascii()),
    where=st.sampled_from(["authorization", "query"]),
)
async def test_non_utf8_tokens_are_refused_as_invalid(raw: bytes, where: str) -> None:
    if where == "authorization":
        options: dict[str, Any] = {
            "headers": [(b"authorization", b"Bearer x" + raw.replace(b"\r", b"").replace(b"\n", b""))]
        }
    else:
        options = {"query": b"token=x" + urllib.parse.quote_from_bytes(raw).encode()}
    async with started() as pomo, FakeSocket(pomo, **options) as ws:
        assert await ws.refusal() == (1008, INVALID)


async def test_rs256_rejects_an_hs256_token_signed_with_the_public_key() -> None:
    """Algorithm confusion: the attacker knows the public key and uses it as an HMAC secret."""
    private, public_pem = rsa_keys()
    config = Settings(jwt_secret=public_pem, jwt_algorithms=("RS256",))
    good = jwt.encode(claims(), private, algorithm="RS256")
    forged = [
        hand_signed({"alg": "HS256", "typ": "JWT"}, claims(), public_pem.encode()),
        hand_signed({"alg": "HS256", "typ": "JWT"}, claims(), public_pem.strip().encode()),
        hand_signed({"alg": "RS256", "typ": "JWT"}, claims(), public_pem.encode()),
        unsigned(claims()),
    ]
    async with started(config) as pomo:
        async with FakeSocket(pomo, query=token_query(good)) as control:
            assert (await control.established())["userId"] == "u1"
            for token in forged:
                for options in placements(token).values():
                    async with FakeSocket(pomo, **options) as ws:
                        assert await ws.refusal() == (1008, INVALID)
            await control.ping_pong()


_ID_TEXT = st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40)


@fuzz_settings
@given(user=st.integers(min_value=-(2**63), max_value=2**63) | _ID_TEXT)
async def test_any_string_or_integer_user_claim_becomes_a_string_user_id(user: int | str) -> None:
    async with started() as pomo, FakeSocket(pomo, query=token_query(make_token(user))) as ws:
        hello = await ws.established()
        assert hello["userId"] == str(user)
        assert pomo.broadcaster.user_connection_count(str(user)) == 1
        event = await pomo.broadcaster.broadcast_to_user(str(user), "TASK_CREATED", None)
        assert (await ws.json())["id"] == event.id


@fuzz_settings
@given(
    user=st.builds(
        lambda head, bad, tail: head + bad + tail,
        _ID_TEXT | st.just(""),
        st.characters(include_characters="\x00\n\r\x1b\x7f\u2028\u2029\ud800\udfff", categories=()),
        _ID_TEXT | st.just(""),
    )
    | st.text(min_size=257, max_size=300)
    | st.just("")
)
async def test_user_ids_with_controls_or_surrogates_or_too_long_are_refused(user: str) -> None:
    """Ids reach log lines and Redis keys: no control characters, no lone surrogates, 1 to 256 characters."""
    token = jwt.encode({"userId": user, "exp": int(time.time() + 60)}, SECRET, algorithm="HS256")
    async with started() as pomo, FakeSocket(pomo, query=token_query(token)) as ws:
        assert await ws.refusal() == (1008, INVALID)
        assert pomo.broadcaster.total_connection_count() == 0
