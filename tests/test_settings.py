from __future__ import annotations

from pathlib import Path

import pytest

from starlette_pomo_ws import BackendUnavailable, ConfigurationError, PomoWS, Settings
from starlette_pomo_ws._settings import redact_url

from .conftest import SECRET

pytestmark = pytest.mark.anyio


def test_from_env_reads_every_kind_of_value(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "JWT_SECRET": SECRET,
            "POMO_WS_HISTORY_SIZE": "50",
            "POMO_WS_SEND_TIMEOUT": "2.5",
            "POMO_WS_JWT_REQUIRE_EXP": "false",
            "POMO_WS_ALLOWED_ORIGINS": "https://app.example.com, https://*.example.org",
            "POMO_WS_TOKEN_QUERY_PARAM": "none",
            "POMO_WS_JWT_AUDIENCE": "",
            "POMO_WS_JWT_ALGORITHMS": "HS256,HS384",
        }
    )
    assert settings.jwt_secret == SECRET
    assert settings.history_size == 50
    assert settings.send_timeout == 2.5
    assert settings.jwt_require_exp is False
    assert settings.allowed_origins == ("https://app.example.com", "https://*.example.org")
    assert settings.token_query_param is None
    assert settings.jwt_audience is None
    assert settings.jwt_algorithms == ("HS256", "HS384")


def test_the_pomo_ws_secret_wins_over_the_guides_fallback() -> None:
    settings = Settings.from_env({"JWT_SECRET": "guide" * 10, "POMO_WS_JWT_SECRET": SECRET})
    assert settings.jwt_secret == SECRET


def test_secret_file_reads_a_pem_key(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----\n")
    settings = Settings.from_env({"POMO_WS_JWT_SECRET_FILE": str(key)})
    assert settings.jwt_secret is not None and settings.jwt_secret.startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(ConfigurationError, match="POMO_WS_JWT_SECRET_FILE"):
        Settings.from_env({"POMO_WS_JWT_SECRET_FILE": str(tmp_path / "missing.pem")})


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("POMO_WS_HISTORY_SIZE", "many", "POMO_WS_HISTORY_SIZE has value 'many', which is not an integer"),
        ("POMO_WS_SEND_TIMEOUT", "soon", "which is not a number"),
        ("POMO_WS_JWT_REQUIRE_EXP", "yes", "which is not a bool"),
    ],
)
def test_malformed_env_values_name_the_variable(var: str, value: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env({var: value})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"history_size": 0}, "'history_size' has value 0"),
        ({"send_timeout": -1}, "'send_timeout' has value -1"),
        ({"heartbeat_interval": "30"}, "'heartbeat_interval' must be a number"),
        ({"jwt_algorithms": "HS256"}, "'jwt_algorithms' must be a tuple"),
        ({"jwt_algorithms": ()}, "'jwt_algorithms' is empty"),
        ({"user_id_claim": ""}, "'user_id_claim' must name a claim"),
    ],
)
def test_bad_values_fail_at_construction(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings(jwt_secret=SECRET, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (Settings(), "'jwt_secret' is missing"),
        (Settings(jwt_secret="short"), "'jwt_secret' is 5 bytes long"),
        (Settings(jwt_secret=SECRET, jwt_algorithms=("none",)), "contains 'none'"),
        (Settings(jwt_secret=SECRET, jwt_algorithms=("HS256", "RS256")), "mixes HMAC and public-key"),
        (Settings(jwt_secret=SECRET, jwt_algorithms=("HS999",)), "unknown algorithms"),
        (Settings(jwt_secret="-----BEGIN PUBLIC KEY-----" + "x" * 40), "holds a PEM key"),
        (Settings(jwt_secret=SECRET, jwt_algorithms=("RS256",)), "must be a PEM public key"),
        (Settings(jwt_secret=SECRET, token_cookie="session"), "'token_cookie' requires 'allowed_origins'"),
        (Settings(jwt_secret=SECRET, allowed_origins=("null",)), "'allowed_origins' has 'null'"),
        (Settings(jwt_secret=SECRET, backend_url="kafka://x"), "unsupported"),
    ],
)
async def test_unusable_settings_fail_when_the_app_starts(settings: Settings, message: str) -> None:
    pomo = PomoWS(settings) if not settings.backend_url.startswith("kafka") else None
    if pomo is None:
        with pytest.raises(ConfigurationError, match=message):
            PomoWS(settings)
        return
    with pytest.raises(ConfigurationError, match=message):
        async with pomo.lifespan():
            pass  # pragma: no cover
    assert not pomo.broadcaster.running


def test_repr_hides_secrets_and_url_passwords() -> None:
    settings = Settings(jwt_secret=SECRET, cursor_secret="cursor-key", backend_url="redis://user:hunter2@redis:6379/0")
    text = repr(settings)
    assert SECRET not in text and "cursor-key" not in text and "hunter2" not in text
    assert "redis://user:***@redis:6379/0" in text
    assert SECRET not in repr(PomoWS(Settings(jwt_secret=SECRET)))


def test_settings_are_immutable() -> None:
    settings = Settings(jwt_secret=SECRET)
    with pytest.raises(AttributeError):
        settings.history_size = 5  # type: ignore[misc]
    assert settings.replace(history_size=5).history_size == 5


def test_pomo_ws_without_settings_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POMO_WS_JWT_SECRET", SECRET)
    monkeypatch.setenv("POMO_WS_HEARTBEAT_INTERVAL", "7")
    pomo = PomoWS()
    assert pomo.settings.jwt_secret == SECRET
    assert pomo.settings.heartbeat_interval == 7


def test_cursor_secret_is_required_for_public_keys_on_a_shared_backend() -> None:
    settings = Settings(jwt_secret="-----BEGIN PUBLIC KEY-----...", jwt_algorithms=("RS256",))
    with pytest.raises(ConfigurationError, match="'cursor_secret' is required"):
        settings.derived_cursor_key(shared=True)
    assert len(settings.derived_cursor_key(shared=False)) == 32
    shared = settings.replace(cursor_secret="same-on-every-node")
    assert shared.derived_cursor_key(shared=True) == shared.derived_cursor_key(shared=True)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:hunter2@redis:6379/0", "redis://user:***@redis:6379/0"),
        ("redis://:hunter2@redis:6379/0", "redis://***@redis:6379/0"),
        ("redis://hunter2@redis/0", "redis://***@redis/0"),
        ("redis://redis:6379/0?password=hunter2", "redis://redis:6379/0?password=***"),
        ("redis://redis/0?db=1&Password=hunter2&ssl_cert_reqs=none", "redis://redis/0?db=1&Password=***&ssl_cert_reqs=none"),
        ("rediss://u:p%40ss@redis/0?password=hunter2#x", "rediss://u:***@redis/0?password=***#x"),
        ("redis://redis/0?pass%77ord=hunter2", "redis://redis/0?pass%77ord=***"),
        ("redis://[::1:6379/0?password=hunter2", "redis://***"),
        ("memory://", "memory://"),
        ("redis://redis:6379/0?socket_timeout=5", "redis://redis:6379/0?socket_timeout=5"),
    ],
)  # fmt: skip
def test_redact_url_masks_userinfo_and_the_password_query_argument(url: str, shown: str) -> None:
    assert redact_url(url) == shown


async def test_a_password_in_the_query_never_shows() -> None:
    """repr(Settings), the backend repr logged at startup and BackendUnavailable messages all mask `?password=`."""
    from starlette_pomo_ws.backends import create_backend

    url = "redis://127.0.0.1:1/0?password=hunter2&socket_connect_timeout=1"
    settings = Settings(jwt_secret=SECRET, backend_url=url)
    assert "hunter2" not in repr(settings)
    assert "password=***" in repr(settings)
    backend = create_backend(settings)
    assert "hunter2" not in repr(backend)
    assert "hunter2" not in repr(PomoWS(settings))

    def ignore(*args: object) -> None:
        pass  # pragma: no cover - nothing arrives from a server that is not there

    with pytest.raises(BackendUnavailable) as exc:
        await backend.start(ignore, ignore)
    assert "hunter2" not in str(exc.value)
    assert "password=***" in str(exc.value)


@pytest.mark.parametrize("secret", ["a", "x" * 31, ""])
async def test_a_short_cursor_secret_is_refused_at_startup(secret: str) -> None:
    pomo = PomoWS(Settings(jwt_secret=SECRET, cursor_secret=secret))
    with pytest.raises(ConfigurationError, match=r"Setting 'cursor_secret' is \d+ bytes long; it needs at least 32"):
        async with pomo.lifespan():
            pass  # pragma: no cover
    async with PomoWS(Settings(jwt_secret=SECRET, cursor_secret="x" * 32)).lifespan():
        pass


def test_health_details_reads_from_the_environment() -> None:
    assert Settings().health_details is True
    assert Settings.from_env({"POMO_WS_HEALTH_DETAILS": "false"}).health_details is False


def test_health_without_details_shows_no_counts() -> None:
    """`health_details=False`: a public health check tells nobody how many users are online."""
    from starlette.testclient import TestClient

    from .conftest import make_app, make_token

    for details in (True, False):
        with TestClient(make_app(PomoWS(Settings(jwt_secret=SECRET, health_details=details)))) as client:
            with client.websocket_connect(f"/ws?token={make_token('a')}") as ws:
                ws.receive_json()
                body = client.get("/ws/health").json()
        if details:
            assert (body["connections"], body["users"]) == (1, 1)
        else:
            assert body == {"status": "ok", "backend": {"kind": "memory", "connected": True}}
