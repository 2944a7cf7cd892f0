"""Erasure requests (GDPR Art. 17, CCPA): who asked to be forgotten, kept in the ledger's database.

A request is identified by a **keyed fingerprint** of the user id, never by the id itself:

    K_fp = HMAC-SHA256(K_enc, "privrec/erasure-fingerprint/v1")
    fingerprint = hex(HMAC-SHA256(K_fp, "user:" || user_id))

(HMAC as a PRF, RFC 2104; the label separates K_fp from every other key derived from the
encryption key, e.g. the synthetic-IV key of ``crypto``). ``K_enc`` is the encryption key
version current when the request was made; the version is stored beside the fingerprint and
old versions stay in the key document, so collect can recompute it for any later record and
keep the user out (``erased_fingerprints``). Without the key a fingerprint says nothing: no
dictionary of user ids can be tried against it.

Until it is processed a request also holds the id encrypted (AES-256-GCM under the same
key, random 96-bit nonce, the fingerprint as associated data; NIST SP 800-38D), because
finding the user's rows needs the id (landing, bronze) and its pseudonyms (silver, training,
serving). Completing the request deletes that ciphertext: afterwards only the fingerprint,
the times and the counts of erased rows remain.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine

from privrec_pipeline.crypto import fingerprint_key
from privrec_pipeline.errors import ConfigurationError
from privrec_pipeline.secrets import KeyRing

PENDING, COMPLETED = "pending", "completed"
MAX_ID_CHARS = 256
# A user id as a source can send it: printable, no whitespace at the ends, no control characters.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

metadata = MetaData()
requests_table = Table(
    "erasure_requests", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_version", String(32), nullable=False),  # encryption key version of the fingerprint
    Column("fingerprint", String(64), nullable=False),
    Column("user_id_enc", LargeBinary),  # nonce || ciphertext || tag while pending; NULL once processed
    Column("state", String(16), nullable=False),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
    Column("erased", Text),  # JSON: rows removed per zone and day (counts only)
    UniqueConstraint("key_version", "fingerprint", name="uq_erasure_fingerprint"),
)
# Other identifiers found in an erased user's own records (their emails), fingerprinted the
# same way ("email:<address>"), so collect also keeps out a line of theirs without a user id.
linked_table = Table(
    "erasure_linked_identifiers", metadata,
    Column("request_id", Integer, nullable=False),
    Column("key_version", String(32), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    UniqueConstraint("key_version", "fingerprint", name="uq_erasure_linked"),
)


def fingerprint(encryption_key: bytes, value: str, kind: str = "user") -> str:
    """The keyed fingerprint of a user id (``kind`` "user") or of an identifier linked to one
    ("email"); see the module docstring."""
    return hmac.new(fingerprint_key(encryption_key), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def check_user_id(value: str, where: str) -> str:
    """A user id as given, or a clear error naming ``where`` it came from."""
    if value == "" or value.strip() == "":
        raise ConfigurationError(f"{where}: the user id is empty")
    if value != value.strip():
        raise ConfigurationError(f"{where}: the user id has spaces at its start or end")
    if _CONTROL.search(value):
        raise ConfigurationError(f"{where}: the user id contains a control character")
    if len(value) > MAX_ID_CHARS:
        raise ConfigurationError(f"{where}: the user id is longer than {MAX_ID_CHARS} characters")
    return value


def read_id_file(path: Path) -> list[str]:
    """User ids of a batch file: one per line; blank lines and lines starting with ``#`` are
    skipped. Every malformed line is named; nothing is accepted from a file with one."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the id file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    ids, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() == "" or line.lstrip().startswith("#"):
            continue
        try:
            ids.append(check_user_id(line, f"{path} line {number}"))
        except ConfigurationError as exc:
            problems.append(str(exc))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ConfigurationError(f"{shown} (nothing was recorded)")
    if not ids:
        raise ConfigurationError(f"{path} holds no user id")
    return ids


@dataclass(frozen=True)
class ErasureRequest:
    id: int
    key_version: str
    fingerprint: str
    state: str
    requested_at: dt.datetime
    completed_at: dt.datetime | None
    erased: dict | None


@dataclass(frozen=True)
class Recorded:
    new: list[ErasureRequest]
    already: list[ErasureRequest]  # the same user asked before (pending or completed)


class ErasureRegister:
    """The erasure requests table in the ledger's database (``config.ledger_url``), and the
    users' data keys beside it (``data_keys``)."""

    def __init__(self, url: str, data_keys_url: str | None = None) -> None:
        from privrec_pipeline.erasure.data_keys import DataKeys
        from privrec_pipeline.privacy.ledger import database_engine, with_ddl_retries

        self.url = url
        self.engine: Engine = database_engine(url)
        with_ddl_retries(self._prepare)  # tasks of two runs open it together
        # Each user's data key (crypto-shredding), in a database of its own when one is given.
        self.data_keys = DataKeys(data_keys_url or url, self)

    def _prepare(self) -> None:
        """Create the tables in one transaction, under the ledger's schema lock."""
        from privrec_pipeline.privacy.ledger import schema_lock

        with self.engine.begin() as conn:
            schema_lock(conn)
            metadata.create_all(conn)

    def record(self, keys: KeyRing, user_ids: Iterable[str], now: dt.datetime | None = None) -> Recorded:
        """Record a request per id (in one transaction); an id already requested is reported,
        not recorded twice."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        when = now or dt.datetime.now(dt.UTC)
        enc = keys.encryption
        new_ids, already = [], []
        with self.engine.begin() as conn:
            known = {(r.key_version, r.fingerprint): r for r in self._rows(conn)}
            for user_id in dict.fromkeys(user_ids):  # a batch naming one id twice records it once
                found = _lookup(keys, user_id, known)
                if found is not None:
                    already.append(found)
                    continue
                fp = fingerprint(enc.material, user_id)
                nonce = os.urandom(12)
                blob = nonce + AESGCM(enc.material).encrypt(nonce, user_id.encode(), _aad(fp))
                new_id = conn.execute(insert(requests_table).values(
                    key_version=enc.version, fingerprint=fp, user_id_enc=blob, state=PENDING,
                    requested_at=when)).inserted_primary_key[0]
                new_ids.append(new_id)
                known[(enc.version, fp)] = ErasureRequest(new_id, enc.version, fp, PENDING, when, None, None)
        return Recorded([r for r in self.requests() if r.id in new_ids], already)

    def _rows(self, conn, state: str | None = None) -> list[ErasureRequest]:
        query = select(requests_table).order_by(requests_table.c.id)
        if state:
            query = query.where(requests_table.c.state == state)
        return [ErasureRequest(r.id, r.key_version, r.fingerprint, r.state, _utc(r.requested_at),
                               _utc(r.completed_at), json.loads(r.erased) if r.erased else None)
                for r in conn.execute(query)]

    def requests(self, state: str | None = None) -> list[ErasureRequest]:
        with self.engine.connect() as conn:
            return self._rows(conn, state)

    def pending_ids(self, keys: KeyRing) -> Iterator[tuple[ErasureRequest, str]]:
        """Each pending request with its user id, decrypted (for the erasure task only)."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        with self.engine.connect() as conn:
            rows = conn.execute(select(requests_table.c.id, requests_table.c.key_version,
                                       requests_table.c.fingerprint, requests_table.c.user_id_enc)
                                .where(requests_table.c.state == PENDING).order_by(requests_table.c.id)).all()
        by_id = {r.id: r for r in self.requests(PENDING)}
        for row in rows:
            key = keys.encryption_versions.get(row.key_version)
            if key is None:
                raise ConfigurationError(
                    f"erasure request {row.id} was recorded under encryption key {row.key_version}, which "
                    "the key document no longer holds: restore that key version to process it")
            blob = bytes(row.user_id_enc)
            user_id = AESGCM(key.material).decrypt(blob[:12], blob[12:], _aad(row.fingerprint)).decode()
            yield by_id[row.id], user_id

    def complete(self, request_id: int, erased: dict, now: dt.datetime | None = None) -> None:
        """Mark a request done: the encrypted id is deleted, the counts kept."""
        with self.engine.begin() as conn:
            conn.execute(update(requests_table).where(requests_table.c.id == request_id).values(
                state=COMPLETED, completed_at=now or dt.datetime.now(dt.UTC), user_id_enc=None,
                erased=json.dumps(erased, sort_keys=True)))

    def link(self, request_id: int, keys: KeyRing, emails: Iterable[str]) -> None:
        """Record the fingerprints of emails found in the request's user's records."""
        with self.engine.begin() as conn:
            present = {(r.key_version, r.fingerprint) for r in conn.execute(select(linked_table))}
            for email in sorted(set(emails)):
                fp = fingerprint(keys.encryption.material, email, "email")
                if (keys.encryption.version, fp) not in present:
                    conn.execute(insert(linked_table).values(request_id=request_id,
                                                             key_version=keys.encryption.version, fingerprint=fp))
                    present.add((keys.encryption.version, fp))

    def fingerprints(self) -> dict[str, set[str]]:
        """Every fingerprint of every request (users, and their linked emails) by encryption
        key version: what collect filters by."""
        out: dict[str, set[str]] = {}
        for r in self.requests():
            out.setdefault(r.key_version, set()).add(r.fingerprint)
        with self.engine.connect() as conn:
            for row in conn.execute(select(linked_table.c.key_version, linked_table.c.fingerprint)):
                out.setdefault(row.key_version, set()).add(row.fingerprint)
        return out


def _lookup(keys: KeyRing, user_id: str, known: dict[tuple[str, str], ErasureRequest]) -> ErasureRequest | None:
    """The request already recorded for ``user_id``, under any key version it was recorded with."""
    for version in sorted({v for v, _ in known}):
        key = keys.encryption_versions.get(version)
        if key is not None and (found := known.get((version, fingerprint(key.material, user_id)))) is not None:
            return found
    return None


def _aad(fp: str) -> bytes:
    return f"erasure-request|{fp}".encode()


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)  # SQLite drops the zone


def open_register(lake: str | None = None) -> ErasureRegister:
    """The deployment's register: the ledger's database (``$PRIVREC_LEDGER_URL`` or the lake's),
    and its data keys in theirs (``config.data_keys_url``)."""
    from privrec_pipeline.config import data_keys_url, ledger_url

    return ErasureRegister(ledger_url(lake), data_keys_url(lake))
