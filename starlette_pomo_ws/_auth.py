from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import logging
import time
import unicodedata
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import jwt

from ._settings import Settings
from .exceptions import AuthenticationError, ConfigurationError

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

__all__ = ["Authenticate", "JWTAuthenticator", "Principal", "RefusalLog", "user_id_problem"]

logger = logging.getLogger("starlette_pomo_ws")

NO_TOKEN = "No authentication token provided"
INVALID_TOKEN = "Invalid authentication token"
EXPIRED_TOKEN = "Authentication token expired"
OTHER_USER = "Token is for another user"
_MAX_TOKEN_LENGTH = 8192


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a connection belongs to.

    Attributes:
        user_id: always a string; a numeric claim is converted with `str()`.
        expires_at: the token's `exp` as a Unix time, or `None` when it never expires.
        claims: the token's claims (or whatever your `authenticate` callable puts there).
    """

    user_id: str
    expires_at: float | None = None
    claims: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        user_id: Any = self.user_id
        if not isinstance(user_id, str):
            object.__setattr__(self, "user_id", str(user_id))


class Authenticate(Protocol):
    """An async callable that checks a handshake and returns its `Principal`.

    Raise `AuthenticationError(reason)` to refuse; the reason becomes the 1008 close reason.
    """

    async def __call__(self, connection: HTTPConnection, /) -> Principal: ...  # pragma: no cover


def bearer_subprotocol(subprotocols: list[str]) -> str | None:
    """The token of a `["bearer", token]` subprotocol pair, if the client offered one."""
    for index, name in enumerate(subprotocols[:-1]):
        if name.strip().lower() == "bearer":
            # Some clients split the header on "," without stripping; a token never has spaces.
            return subprotocols[index + 1].strip()
    return None


def raw_header(scope: Mapping[str, Any], name: bytes) -> str | None:
    """One request header, read straight from the ASGI scope (`name` in lower case).

    A handshake needs two or three headers; building Starlette's `Headers` for them costs more.
    """
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def find_token(connection: HTTPConnection, settings: Settings) -> str | None:
    """The token of a handshake, from the subprotocol pair, `Authorization: Bearer`, the query or a cookie."""
    token = bearer_subprotocol(list(connection.scope.get("subprotocols") or ()))
    if token:
        return token
    authorization = raw_header(connection.scope, b"authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    if settings.token_query_param is not None:
        token = connection.query_params.get(settings.token_query_param)
        if token:
            return token
    if settings.token_cookie is not None:
        token = connection.cookies.get(settings.token_cookie)
        if token:
            return token
    return None


class JWTAuthenticator:
    """The default `authenticate`: checks a JWT with PyJWT, as the settings say.

    Wrap it in your own `authenticate` to add a check, e.g. a deny-list of banned users.

    Raises:
        ConfigurationError: the settings cannot check tokens (a missing or short key, algorithms that
            do not fit the key).
    """

    def __init__(self, settings: Settings) -> None:
        settings.check(custom_authenticate=False)
        self.settings = settings
        self._jwt = jwt.PyJWT()
        self._algorithms = list(settings.jwt_algorithms)
        self._options: dict[str, Any] = {"require": ["exp"] if settings.jwt_require_exp else []}
        key: Any = settings.jwt_secret or ""
        if "-----BEGIN" in key:
            key = _load_public_key(key, self._algorithms)
        self._key = key

    def __repr__(self) -> str:
        return f"JWTAuthenticator(algorithms={self._algorithms!r}, user_id_claim={self.settings.user_id_claim!r})"

    async def __call__(self, connection: HTTPConnection, /) -> Principal:
        token = find_token(connection, self.settings)
        if not token:
            raise AuthenticationError(NO_TOKEN)
        return self.decode(token)

    def decode(self, token: str) -> Principal:
        """Check a token and return its principal.

        Raises:
            AuthenticationError: with the close reason for the client, and a `detail` for the log.
        """
        if len(token) > _MAX_TOKEN_LENGTH:
            raise AuthenticationError(INVALID_TOKEN, detail=f"the token is longer than {_MAX_TOKEN_LENGTH} characters")
        settings = self.settings
        try:
            claims = self._jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                leeway=settings.jwt_leeway,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError(EXPIRED_TOKEN, detail="expired (its 'exp' has passed)") from None
        # PyJWTError covers InvalidKeyError (a token for an algorithm the key cannot check); older PyJWT raises
        # RecursionError on a deeply nested header, and a huge number in a claim raises OverflowError.
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError, OverflowError) as exc:
            raise AuthenticationError(INVALID_TOKEN, detail=self._explain(exc, token)) from None
        user_id = claims.get(settings.user_id_claim)
        if isinstance(user_id, bool) or not isinstance(user_id, str | int):
            hint = ' (hint: set user_id_claim="sub")' if settings.user_id_claim != "sub" and "sub" in claims else ""
            what = "missing claim" if user_id is None else "unusable claim"
            raise AuthenticationError(INVALID_TOKEN, detail=f"{what} {settings.user_id_claim!r}{hint}")
        user_id = str(user_id)  # an integer too long for str() is refused by json.loads already
        problem = user_id_problem(user_id)
        if problem:
            raise AuthenticationError(INVALID_TOKEN, detail=f"claim {settings.user_id_claim!r}: {problem}")
        return Principal(user_id, _expiry(claims), claims)

    def _explain(self, exc: BaseException, token: str) -> str:
        """Why PyJWT refused a token, for the log line (never the token itself)."""
        settings = self.settings
        if isinstance(exc, jwt.MissingRequiredClaimError):
            if exc.claim == "exp":
                return "missing exp (mint tokens with an 'exp', or set jwt_require_exp=False)"
            return f"missing claim {exc.claim!r}"
        if isinstance(exc, jwt.InvalidSignatureError):
            return "bad signature (the token was signed with another key)"
        if isinstance(exc, jwt.InvalidAudienceError):
            return f"wrong audience (expected {settings.jwt_audience!r})"
        if isinstance(exc, jwt.InvalidIssuerError):
            return f"wrong issuer (expected {settings.jwt_issuer!r})"
        if isinstance(exc, jwt.ImmatureSignatureError):
            return "not valid yet (its 'nbf' or 'iat' is in the future)"
        if isinstance(exc, jwt.InvalidAlgorithmError | jwt.InvalidKeyError):
            return f"unsupported algorithm {_token_algorithm(token)!r} (accepted: {', '.join(self._algorithms)})"
        if isinstance(exc, RecursionError | OverflowError):
            return f"malformed token ({type(exc).__name__})"
        return f"malformed token ({type(exc).__name__}: {str(exc)[:100]})"


def _load_public_key(pem: str, algorithms: list[str]) -> Any:
    """Load a PEM public key, and refuse algorithms it cannot check (a token for one would be a 1011)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"Setting 'jwt_secret' is not a readable PEM public key: {exc}") from None
    fits: set[str]
    if isinstance(key, rsa.RSAPublicKey):
        kind, fits = "an RSA key", {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    elif isinstance(key, ec.EllipticCurvePublicKey):
        curve = {"secp256r1": "ES256", "secp256k1": "ES256K", "secp384r1": "ES384", "secp521r1": "ES512"}
        kind, fits = f"an EC key on {key.curve.name}", {curve.get(key.curve.name, "")}
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        kind, fits = "an Ed25519/Ed448 key", {"EdDSA"}
    else:
        raise ConfigurationError(f"Setting 'jwt_secret' holds a {type(key).__name__}, which JWTs cannot use.")
    wrong = [alg for alg in algorithms if alg not in fits]
    if wrong:
        raise ConfigurationError(
            f"Setting 'jwt_algorithms' has {', '.join(wrong)}, which {kind} in 'jwt_secret' cannot check; "
            "accept only the algorithms of your key (RS*/PS* for RSA, ES256/ES384/ES512 by curve, EdDSA for Ed25519)."
        )
    return key


def _token_algorithm(token: str) -> str:
    try:
        alg = jwt.get_unverified_header(token).get("alg")
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
        return "?"
    return alg[:20] if isinstance(alg, str) else "?"


#: The last second of year 9999 (UTC): the latest `exp` a timestamp can be written for.
MAX_EXP = 253402300799


def _expiry(claims: Mapping[str, Any]) -> float | None:
    """The token's `exp` as a Unix time, refusing what PyJWT lets through (numeric strings, bools, year 10000)."""
    if "exp" not in claims:
        return None
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise AuthenticationError(INVALID_TOKEN, detail=f"claim 'exp' must be a number, not {type(exp).__name__}")
    if not 0 < exp <= MAX_EXP:  # also refuses NaN
        raise AuthenticationError(INVALID_TOKEN, detail="claim 'exp' is out of range (after year 9999)")
    return float(exp)


_MAX_USER_ID_LENGTH = 256
# Controls, line and paragraph separators, surrogates: what would forge or break a log line or a Redis key.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def user_id_problem(user_id: str) -> str | None:
    """Why `user_id` is not a usable user id, or `None` when it is (1 to 256 characters, no controls)."""
    if not user_id:
        return "the user id is empty"
    if len(user_id) > _MAX_USER_ID_LENGTH:
        return f"the user id is longer than {_MAX_USER_ID_LENGTH} characters"
    if not user_id.isprintable():  # fast path: every printable string is fine
        for char in user_id:
            if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
                return f"the user id contains the character {char!r}"
    return None


def origin_allowed(origin: str | None, allowed: tuple[str, ...] | None, *, cookie_auth: bool) -> bool:
    """Whether a handshake's `Origin` passes `allowed_origins` (exact origins or `*.example.com` wildcards)."""
    if allowed is None:
        return origin != "null"
    if origin is None:
        return not cookie_auth
    if origin == "null":
        return False
    origin = origin.lower().rstrip("/")
    for pattern in allowed:
        pattern = pattern.lower().rstrip("/")
        if pattern == origin or ("*" in pattern and _wildcard_match(origin, pattern)):
            return True
    return False


def _wildcard_match(origin: str, pattern: str) -> bool:
    scheme, _, host = origin.partition("://")
    p_scheme, _, p_host = pattern.partition("://")
    if scheme != p_scheme or not p_host.startswith("*."):
        return False
    # "*.example.com" matches "a.example.com" and "a.b.example.com", never "example.com" or "evil-example.com".
    return host.endswith(p_host[1:]) and fnmatch.fnmatchcase(host, p_host) and len(host) > len(p_host) - 1


class RefusalLog:
    """WARNING lines for refused handshakes, at most `per_second` per reason, so a flood cannot fill the log.

    Lines past the limit are counted, and one summary line ("N more refusals ... suppressed") follows
    when the second is over. Callers pass the reason and a log-only detail, never the token. It runs
    in the event loop of the handshakes (it schedules the summary there).
    """

    def __init__(self, per_second: int = 5, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self._clock = clock
        self._windows: dict[str, list[float]] = {}  # reason -> [window start, lines logged, lines suppressed]

    def refused(self, kind: str, reason: str, detail: str | None = None, client: Any = None) -> None:
        """Log one refused handshake: `kind` is `auth`, `origin` or `limit`; `reason` is the close reason."""
        now = self._clock()
        key = f"{kind}: {reason}"
        window = self._windows.get(key)
        if window is None or now - window[0] >= 1.0:
            if window is not None:
                self._summary(key, window)
            window = self._windows[key] = [now, 0, 0]
            if len(self._windows) > 64:  # reasons come from our code and custom authenticate: bound them anyway
                for stale in [k for k, w in self._windows.items() if now - w[0] >= 1.0]:
                    self._summary(stale, self._windows.pop(stale))
        if window[1] >= self.per_second:
            window[2] += 1
            if window[2] == 1:  # the summary must come even if this was the flood's last line
                asyncio.get_running_loop().call_later(window[0] + 1.0 - now, self._close, key, window)
            return
        window[1] += 1
        peer = f" from {client[0]}:{client[1]}" if isinstance(client, list | tuple) and len(client) == 2 else ""
        if detail:
            logger.warning("Refused a WebSocket%s (%s): %s; %s", peer, kind, reason, detail)
        else:
            logger.warning("Refused a WebSocket%s (%s): %s", peer, kind, reason)

    @staticmethod
    def _summary(key: str, window: list[float]) -> None:
        if window[2]:
            logger.warning("%d more refusals (%s) suppressed in one second", int(window[2]), key)
            window[2] = 0

    def _close(self, key: str, window: list[float]) -> None:
        if self._windows.get(key) is window:
            self._summary(key, window)
