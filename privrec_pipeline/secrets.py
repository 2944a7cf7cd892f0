"""Key material for pseudonymization (HMAC) and bronze encryption (AES-GCM).

Keys never come from code. They are resolved, in order, from:

1. ``PRIVREC_KEYS_JSON``: the key document itself (set by the DAG's Spark operator from the
   Airflow connection ``privrec_keys``, or by the deployment's secret injection);
2. ``PRIVREC_KEY_FILE``: a path to the key document (must not be readable by group/others);
3. ``~/.config/privrec/keys.json``, created by ``privrec keys init`` with mode 0600.

The key document::

    {"pseudonym": {"current": "v2", "keys": {"v1": "<64 hex chars>", "v2": "<64 hex chars>"},
                   "retired": {"v1": "2026-03-01T00:00:00+00:00"}},
     "encryption": {"current": "v1", "keys": {"v1": "<64 hex chars>"}}}

Older versions stay in ``keys``: bronze written under an old encryption key can still be
decrypted, and an old pseudonym key can still recompute the pseudonyms of the days it wrote
(e.g. to find a person's rows for an erasure request). ``retired`` records when a version
stopped being current (``privrec keys rotate``); a label is never reused, and a retired
version cannot be made current again.

A key is identified by its *fingerprint*, not by its label: two key files created
independently both call their key ``v1``, yet give every person different pseudonyms. The
manifests record the fingerprint, and build_partitions refuses a window that mixes two.
Objects holding keys never print them: their ``repr`` shows only the version and fingerprint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets as _random
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privrec_pipeline.durable_files import replace, write_once
from privrec_pipeline.errors import SecretsError

ENV_KEYS_JSON = "PRIVREC_KEYS_JSON"
ENV_KEY_FILE = "PRIVREC_KEY_FILE"
DEFAULT_KEY_FILE = Path("~/.config/privrec/keys.json")
KEY_PURPOSES = ("pseudonym", "encryption")
KEY_BYTES = 32  # AES-256 for encryption; 256-bit HMAC key (RFC 2104: at least L=32 bytes)
# Domain-separated from every other HMAC input of privrec: pseudonym messages are
# "<namespace>:<value>" and the synthetic-IV key label is "privrec/aes-gcm-synthetic-iv/v1".
FINGERPRINT_LABEL = b"privrec-key-fingerprint-v1"
FINGERPRINT_HEX_CHARS = 16  # 64 bits: a label, not a security parameter (accidental collisions ~2^-32 at 2^16 keys)
_VERSION_LABEL = re.compile(r"v(\d+)")


def key_fingerprint(material: bytes) -> str:
    """HMAC-SHA256(key, FINGERPRINT_LABEL), first 16 hex chars (RFC 2104; FIPS 198-1).

    HMAC is a PRF keyed by the key itself (Bellare, "New Proofs for NMAC and HMAC", 2006), so
    the fingerprint reveals nothing about the key and cannot be computed without it; equal
    fingerprints mean (up to a 2^-64 accident) the same key, whatever its label.
    """
    return hmac.new(material, FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:FINGERPRINT_HEX_CHARS]


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

    @property
    def fingerprint(self) -> str:
        """Identifies the key (not just its label) without revealing it; see ``key_fingerprint``."""
        return key_fingerprint(self.material)

    def __repr__(self) -> str:
        return f"VersionedKey(version={self.version!r}, fingerprint={self.fingerprint!r})"


@dataclass(frozen=True)
class KeyRing:
    """Current keys per purpose plus older versions (decryption of old bronze, old pseudonyms)."""

    pseudonym: VersionedKey
    encryption: VersionedKey
    encryption_versions: Mapping[str, VersionedKey] = field(default_factory=dict, repr=False)
    pseudonym_versions: Mapping[str, VersionedKey] = field(default_factory=dict, repr=False)

    @property
    def encryption_keys(self) -> dict[str, VersionedKey]:
        """Every encryption key version the ring holds, the current one included."""
        return {**self.encryption_versions, self.encryption.version: self.encryption}

    def secret_strings(self) -> list[str]:
        """Every textual form of every key (hex), for leak checks in tests and logs masking."""
        keys = [self.pseudonym, self.encryption, *self.encryption_versions.values(),
                *self.pseudonym_versions.values()]
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
    retired = section.get("retired", {})
    if not isinstance(retired, Mapping):
        raise SecretsError(f"{source}: section {purpose!r}: 'retired' must map versions to the time they were retired")
    if current in retired:
        raise SecretsError(f"{source}: section {purpose!r}: current version {current!r} was retired at "
                           f"{retired[current]}; a retired key is never made current again: run "
                           f"'privrec keys rotate --purpose {purpose}' for a new one")
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
    doc = _load_document(text, source)
    pseudonym, pseudo_versions = _parse_purpose(doc, "pseudonym", source)
    encryption, enc_versions = _parse_purpose(doc, "encryption", source)
    return KeyRing(pseudonym=pseudonym, encryption=encryption, encryption_versions=enc_versions,
                   pseudonym_versions=pseudo_versions)


def _load_document(text: str, source: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SecretsError(f"{source}: not valid JSON (line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise SecretsError(f"{source}: expected a JSON object")
    return doc


def key_file_path() -> Path:
    return Path(os.environ.get(ENV_KEY_FILE) or DEFAULT_KEY_FILE).expanduser()


def _read_key_file(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecretsError(f"{path}: key file is accessible by group/others (mode {mode:o}); run 'chmod 600 {path}'")
    return path.read_text(encoding="utf-8")


def _resolve_document(environ: Mapping[str, str] | None, path: Path | None) -> tuple[str, str]:
    """(document text, source name): ``path`` if given, else the order of the module docstring."""
    env = os.environ if environ is None else environ
    if path is None and env.get(ENV_KEYS_JSON):
        return env[ENV_KEYS_JSON], f"${ENV_KEYS_JSON}"
    target = (path or Path(env.get(ENV_KEY_FILE) or DEFAULT_KEY_FILE)).expanduser()
    if not target.exists():
        raise SecretsError(
            f"No privrec keys configured: {target} does not exist and ${ENV_KEYS_JSON} is not set. "
            "Run 'privrec keys init' for a local key file, or set the Airflow connection "
            "'privrec_keys' / $PRIVREC_KEYS_JSON in production."
        )
    return _read_key_file(target), str(target)


def load_keyring(environ: Mapping[str, str] | None = None) -> KeyRing:
    """Resolve the key ring (see module docstring for the order)."""
    return parse_key_document(*_resolve_document(environ, None))


@dataclass(frozen=True)
class KeyInfo:
    """One key version as ``privrec keys show`` prints it: never the key itself."""

    purpose: str
    version: str
    fingerprint: str
    state: str  # current | retired | older (kept, never current since this file records it)
    retired_at: str | None = None


def key_inventory(environ: Mapping[str, str] | None = None, path: Path | None = None) -> tuple[str, list[KeyInfo]]:
    """(source, every key version with its fingerprint and state), current first per purpose."""
    text, source = _resolve_document(environ, path)
    ring = parse_key_document(text, source)
    doc = _load_document(text, source)
    rows = []
    for purpose, current, versions in (("pseudonym", ring.pseudonym, ring.pseudonym_versions),
                                       ("encryption", ring.encryption, ring.encryption_versions)):
        retired = doc[purpose].get("retired", {})
        for key in sorted(versions.values(), key=lambda k: (k.version != current.version, k.version)):
            state = "current" if key.version == current.version else "retired" if key.version in retired else "older"
            rows.append(KeyInfo(purpose, key.version, key.fingerprint, state, retired.get(key.version)))
    return source, rows


def new_key_document() -> dict[str, Any]:
    """A fresh key document with random 256-bit keys (os.urandom via ``secrets``)."""
    return {p: {"current": "v1", "keys": {"v1": _random.token_hex(KEY_BYTES)}} for p in KEY_PURPOSES}


def _document_bytes(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True).encode("utf-8")


def init_key_file(path: Path | None = None) -> tuple[Path, bool]:
    """Create the local key file (mode 0600) unless it exists. Returns (path, created).

    The document is written to a 0600 temp file in the same folder, fsynced, then linked to its
    name: ``link`` fails if the name exists (an existing key is never overwritten), and a crash
    leaves either no key file or a complete one, never a half-written one.
    """
    target = (path or key_file_path()).expanduser()
    if target.exists():
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # created meanwhile by another process: that one is kept
    return target, write_once(target, _document_bytes(new_key_document()), mode=0o600)


@dataclass(frozen=True)
class Rotation:
    """What ``rotate_key_file`` did: versions and fingerprints, never keys."""

    path: Path
    purpose: str
    old: VersionedKey
    new: VersionedKey


def next_version(labels: list[str]) -> str:
    """``v<n+1>`` for the largest ``v<n>`` among ``labels`` (current, older and retired ones)."""
    numbers = [int(m.group(1)) for label in labels if (m := _VERSION_LABEL.fullmatch(label))]
    return f"v{max(numbers, default=0) + 1}"


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on the key file's folder: two rotations never interleave."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def rotate_key_file(path: Path | None, purpose: str) -> Rotation:
    """Make a new random key the current one of ``purpose`` in the key file.

    The new key gets the next free label (v2, v3, ...; a label is never reused). The old key
    stays in ``keys`` (to decrypt old bronze, or to recompute old pseudonyms) and is recorded
    in ``retired``. The file is replaced atomically (0600 temp file in the same folder, fsync,
    ``os.replace``): a crash leaves the old or the new document, never a half-written one.
    """
    if purpose not in KEY_PURPOSES:
        raise SecretsError(f"unknown key purpose {purpose!r}: expected one of {', '.join(KEY_PURPOSES)}")
    target = (path or key_file_path()).expanduser()
    if not target.exists():
        raise SecretsError(f"{target} does not exist: run 'privrec keys init' first (nothing to rotate)")
    with _folder_lock(target.parent):
        text = _read_key_file(target)
        ring = parse_key_document(text, str(target))  # validates the whole document first
        doc = _load_document(text, str(target))
        section = doc[purpose]
        retired = dict(section.get("retired", {}))
        old = ring.pseudonym if purpose == "pseudonym" else ring.encryption
        version = next_version([*section["keys"], *retired])
        material = _random.token_hex(KEY_BYTES)
        retired[old.version] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        doc[purpose] = {**section, "current": version, "keys": {**section["keys"], version: material},
                        "retired": retired}
        parse_key_document(json.dumps(doc), str(target))  # the new document must load
        replace(target, _document_bytes(doc), mode=0o600)
    return Rotation(target, purpose, old, VersionedKey(version, bytes.fromhex(material)))
