"""Key material for pseudonymization (HMAC) and bronze encryption (AES-GCM).

Keys never come from code. They are resolved, in order, from:

1. ``PRIVREC_KEYS_JSON``: the key document itself (set by the DAG's Spark operator from the
   Airflow connection ``privrec_keys``, or by the deployment's secret injection);
2. ``PRIVREC_KEY_FILE``: a path to the key document (must not be readable by group/others);
3. ``~/.config/privrec/keys.json``, created by ``privrec keys init`` with mode 0600.

The key document::

    {"pseudonym": {"current": "v1", "keys": {"v1": "<64 hex chars>"}},
     "encryption": {"current": "v1", "keys": {"v1": "<64 hex chars>"}}}

Older versions stay in ``keys`` so bronze written under them can still be decrypted.
Objects holding keys never print them: their ``repr`` shows only the version.
"""

from __future__ import annotations

import json
import os
import secrets as _random
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privrec_pipeline.errors import SecretsError

ENV_KEYS_JSON = "PRIVREC_KEYS_JSON"
ENV_KEY_FILE = "PRIVREC_KEY_FILE"
DEFAULT_KEY_FILE = Path("~/.config/privrec/keys.json")
KEY_PURPOSES = ("pseudonym", "encryption")
KEY_BYTES = 32  # AES-256 for encryption; 256-bit HMAC key (RFC 2104: at least L=32 bytes)


@dataclass(frozen=True)
class VersionedKey:
    """One secret key and its version label. ``repr`` never shows the key."""

    version: str
    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.material) not in (16, 24, 32):
            raise SecretsError(
                f"VersionedKey: key {self.version!r} must be 16, 24 or 32 bytes, not {len(self.material)}"
            )


@dataclass(frozen=True)
class KeyRing:
    """Current keys per purpose plus older versions (for decryption of old bronze)."""

    pseudonym: VersionedKey
    encryption: VersionedKey
    encryption_versions: Mapping[str, VersionedKey] = field(default_factory=dict, repr=False)

    def secret_strings(self) -> list[str]:
        """Every textual form of every key (hex), for leak checks in tests and logs masking."""
        keys = [self.pseudonym, self.encryption, *self.encryption_versions.values()]
        return sorted({k.material.hex() for k in keys} | {k.material.hex().upper() for k in keys})


def _parse_purpose(doc: Mapping[str, Any], purpose: str, source: str) -> tuple[VersionedKey, dict[str, VersionedKey]]:
    section = doc.get(purpose)
    if not isinstance(section, Mapping):
        raise SecretsError(f"{source}: missing section {purpose!r} (expected {{'current': ..., 'keys': {{...}}}})")
    keys = section.get("keys")
    current = section.get("current")
    if not isinstance(keys, Mapping) or not keys:
        raise SecretsError(f"{source}: section {purpose!r} has no 'keys'")
    if current not in keys:
        raise SecretsError(f"{source}: section {purpose!r}: current version {current!r} is not among its keys")
    versions: dict[str, VersionedKey] = {}
    for version, hexkey in keys.items():
        try:
            material = bytes.fromhex(str(hexkey))
        except ValueError:
            raise SecretsError(f"{source}: {purpose} key {version!r} is not hexadecimal") from None
        versions[str(version)] = VersionedKey(str(version), material)
    return versions[str(current)], versions


def parse_key_document(text: str, source: str) -> KeyRing:
    """Parse a key document; errors name the source, never the key."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SecretsError(f"{source}: not valid JSON (line {exc.lineno})") from None
    if not isinstance(doc, Mapping):
        raise SecretsError(f"{source}: expected a JSON object")
    pseudonym, _ = _parse_purpose(doc, "pseudonym", source)
    encryption, enc_versions = _parse_purpose(doc, "encryption", source)
    return KeyRing(pseudonym=pseudonym, encryption=encryption, encryption_versions=enc_versions)


def key_file_path() -> Path:
    return Path(os.environ.get(ENV_KEY_FILE) or DEFAULT_KEY_FILE).expanduser()


def load_keyring(environ: Mapping[str, str] | None = None) -> KeyRing:
    """Resolve the key ring (see module docstring for the order)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_KEYS_JSON):
        return parse_key_document(env[ENV_KEYS_JSON], f"${ENV_KEYS_JSON}")
    path = Path(env.get(ENV_KEY_FILE) or DEFAULT_KEY_FILE).expanduser()
    if not path.exists():
        raise SecretsError(
            f"No privrec keys configured: {path} does not exist and ${ENV_KEYS_JSON} is not set. "
            "Run 'privrec keys init' for a local key file, or set the Airflow connection "
            "'privrec_keys' / $PRIVREC_KEYS_JSON in production."
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecretsError(f"{path}: key file is accessible by group/others (mode {mode:o}); run 'chmod 600 {path}'")
    return parse_key_document(path.read_text(encoding="utf-8"), str(path))


def new_key_document() -> dict[str, Any]:
    """A fresh key document with random 256-bit keys (os.urandom via ``secrets``)."""
    return {p: {"current": "v1", "keys": {"v1": _random.token_hex(KEY_BYTES)}} for p in KEY_PURPOSES}


def init_key_file(path: Path | None = None) -> tuple[Path, bool]:
    """Create the local key file (mode 0600) unless it exists. Returns (path, created)."""
    target = (path or key_file_path()).expanduser()
    if target.exists():
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # O_EXCL + 0600 at creation: the key is never on disk with wider permissions.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(new_key_document(), fh)
    return target, True
