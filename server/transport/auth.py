"""Bearer-token authentication and role-based authorization.

Tokens live in a JSON file, stored only as SHA-256 hex digests:

    {"tokens": [{"name": "feature-pipeline", "sha256": "<64 hex>", "role": "train",
                 "layer_prefix": "team-a/"}]}

Roles nest: `infer` may run eval requests and read layers; `train` may also run train
requests; `admin` may also create/delete layers and load/reset state. Every role may
register shared-memory regions (its own only: they belong to the token). A token with a
`layer_prefix` only sees and touches layers whose names start with it. With no tokens file
the server does no authentication (its default on 127.0.0.1).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger("normserve.auth")

ROLES = ("infer", "train", "admin")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Unauthenticated(Exception):
    """Missing or invalid credentials."""


class PermissionDenied(Exception):
    """Valid credentials without the right for this call."""


class Action(enum.Enum):
    READ = "reading layers"
    EVAL = "eval requests"
    TRAIN = "train requests"
    ADMIN = "creating/deleting layers and loading/resetting state"
    SHARED_MEMORY = "registering shared memory"


_NEEDS = {
    Action.READ: "infer",
    Action.EVAL: "infer",
    Action.TRAIN: "train",
    Action.ADMIN: "admin",
    Action.SHARED_MEMORY: "infer",
}


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    layer_prefix: str = ""

    def may_see(self, layer: str) -> bool:
        return layer.startswith(self.layer_prefix)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "ns_" + secrets.token_urlsafe(32)


def load_tokens(path: str) -> list[tuple[bytes, Principal]]:
    """Parse and validate a tokens file; raises ValueError saying what is wrong."""
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    entries = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'{path}: expected {{"tokens": [...]}}')
    table = []
    for i, entry in enumerate(entries):
        where = f"{path}: tokens[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object")
        unknown = set(entry) - {"name", "sha256", "role", "layer_prefix"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        name, sha, role = entry.get("name"), entry.get("sha256"), entry.get("role")
        prefix = entry.get("layer_prefix", "")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: 'name' must be a non-empty string")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise ValueError(f"{where}: 'sha256' must be 64 lowercase hex digits (the token's SHA-256)")
        if role not in ROLES:
            raise ValueError(f"{where}: 'role' must be one of {', '.join(ROLES)}")
        if not isinstance(prefix, str):
            raise ValueError(f"{where}: 'layer_prefix' must be a string")
        table.append((bytes.fromhex(sha), Principal(name, role, prefix)))
    return table


class Authorizer:
    """Checks calls against the tokens file; `reload()` re-reads it (on SIGHUP)."""

    def __init__(self, tokens_file: str = ""):
        self.tokens_file = tokens_file
        self._table: list[tuple[bytes, Principal]] = load_tokens(tokens_file) if tokens_file else []
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_file)

    def reload(self) -> bool:
        """Re-read the tokens file; a bad file keeps the current tokens (and says why)."""
        if not self.enabled:
            return False
        try:
            table = load_tokens(self.tokens_file)
        except (OSError, ValueError) as e:
            log.error("tokens file not reloaded, keeping the %d current token(s): %s", len(self._table), e)
            return False
        with self._lock:
            self._table = table
        log.info("tokens file reloaded: %d token(s)", len(table))
        return True

    def authenticate(self, metadata: Any) -> Optional[Principal]:
        """The caller's principal (None when authentication is off)."""
        if not self.enabled:
            return None
        header = next((v for k, v in (metadata or ()) if k == "authorization"), None)
        if header is None:
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <token>'")
        wanted = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for stored, principal in self._table:  # compare with every entry: no early exit
            if hmac.compare_digest(stored, wanted):
                found = principal
        if found is None:
            raise Unauthenticated("invalid token")
        return found

    @staticmethod
    def check(principal: Optional[Principal], action: Action, layer: Optional[str] = None) -> None:
        if principal is None:
            return
        needed = _NEEDS[action]
        if ROLES.index(principal.role) < ROLES.index(needed):
            raise PermissionDenied(
                f"token {principal.name!r} has role {principal.role!r}; {action.value} need role {needed!r}"
            )
        if layer is not None and not principal.may_see(layer):
            raise PermissionDenied(
                f"token {principal.name!r} may only use layers whose names start with {principal.layer_prefix!r}"
            )
