"""Per-user data keys: crypto-shredding of bronze identifiers and quarantined raw lines.

Envelope encryption (NIST SP 800-57 Part 1 Rev. 5, section 6.1.1: key-wrapping keys and data
keys):

- every user u gets a random 256-bit data key DEK_u (``os.urandom``) per encryption key
  version v, created by the first collect that meets them;
- DEK_u is stored only wrapped, with the AES key wrap of RFC 3394 (``cryptography``'s
  ``aes_key_wrap``) under K_wrap,v = HMAC-SHA256(K_enc,v, "privrec/user-data-key-wrap/v1")
  (HMAC as a PRF to derive a separate key, RFC 2104; the label keeps K_wrap apart from every
  other key derived from K_enc), in the table ``user_data_keys`` of a database of its own
  (``config.data_keys_url``), keyed by (v, the user's keyed fingerprint of ``erasure.requests``);
- collect **seals** a row of user u: the ciphertext it computes under K_enc
  (``crypto.encrypt``) is encrypted once more under DEK_u, again with ``crypto.encrypt`` and
  the row's associated data, its synthetic IV keyed by HMAC(DEK_u, label), so nothing in the
  sealed value depends on a key other than DEK_u. The row's ``data_key`` column holds the
  fingerprint that names DEK_u. A line without a user id (a broken line in quarantine) has
  no user to key by: it stays under K_enc alone, ``data_key`` NULL;
- erasing u deletes DEK_u under every version (``DataKeys.shred``): every copy of u's sealed
  rows, in the lake, a backup or an old snapshot, is then AES-GCM ciphertext under a key that
  exists nowhere (NIST SP 800-88 Rev. 1, "cryptographic erase").

Two layers rather than one: collect makes one pass over the landing JSON and learns the day's
users only from it, so their data keys are looked up (or created) after that pass, and the
outer layer is added while bronze and quarantine are written from the staged pass: one more
AES-GCM per row, where re-encrypting would cost a decryption and an encryption.

What shredding does not reach: bronze's user id and event fields (in clear there, removed by
the erasure task, kept by an old copy of bronze); backups of the data keys' database (and, on
PostgreSQL, its WAL archives), which hold the wrapped keys: keep them no longer than the time
allowed to complete an erasure (K_enc is never destroyed, so an old backup would unwrap them);
and a collect killed before its cleanup, whose staging folder holds the day under K_enc alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    DateTime,
    LargeBinary,
    MetaData,
    String,
    Table,
    delete,
    select,
    text,
    tuple_,
)
from sqlalchemy.engine import Connection

from privrec_pipeline import crypto
from privrec_pipeline.erasure.requests import MAX_ID_CHARS, fingerprint
from privrec_pipeline.errors import ConfigurationError, PrivrecError
from privrec_pipeline.secrets import KeyRing

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

WRAP_LABEL = b"privrec/user-data-key-wrap/v1"
DATA_KEY = "data_key"  # the column naming a row's data key (the user's fingerprint)
USER_ID = "user_id"  # the column a row's user is found by
DEK_COLUMNS = ("dek", "dek_iv_ipad", "dek_iv_opad")
CHUNK = 5_000  # fingerprints per SQL statement (SQLite allows 32,766 parameters)
BROADCAST_MAX_KEYS = 500_000  # data keys up to this many are broadcast to the rows (~120 MB)


class ShreddedError(PrivrecError):
    """A row's data key no longer exists: its user was erased."""


class DataKeyMissingError(PrivrecError):
    """A row names a data key that is not stored, for a user who never asked to be erased: the
    ledger database was lost, reset, restored from an older backup, or is not this lake's."""


def wrap_key(encryption_key: bytes) -> bytes:
    return hmac.new(encryption_key, WRAP_LABEL, hashlib.sha256).digest()


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]


metadata = MetaData()
# Each user's data key, wrapped under the encryption key version it belongs to: erasing the
# user deletes the row. In a database of its own (``config.data_keys_url``), so that its
# backups can be kept shorter than an erasure may take while the ledger's are kept long.
data_keys_table = Table(
    "user_data_keys", metadata,
    Column("key_version", String(32), primary_key=True),
    Column("fingerprint", String(64), primary_key=True),  # the user's fingerprint under that version
    Column("wrapped_key", LargeBinary, nullable=False),  # RFC 3394 AES key wrap of the 256-bit key
    Column("created_at", DateTime(timezone=True), nullable=False),
)


class DataKeys:
    """The ``user_data_keys`` table at ``url``; ``register`` (the erasure register) says who
    asked to be erased."""

    def __init__(self, url: str, register: Any) -> None:
        from sqlalchemy.engine import make_url

        from privrec_pipeline.privacy.ledger import database_engine, with_ddl_retries

        database = make_url(url).database
        if make_url(url).get_backend_name() == "sqlite" and database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))  # the user's only, before SQLite creates it
        self.engine = database_engine(url)
        self.register = register
        with_ddl_retries(self._prepare)

    def _prepare(self) -> None:
        from privrec_pipeline.privacy.ledger import schema_lock

        with self.engine.begin() as conn:
            schema_lock(conn)
            metadata.create_all(conn)

    def _erased(self, version: str) -> set[str]:
        return self.register.fingerprints().get(version, set())

    def ensure(self, keys: KeyRing, fingerprints: Iterable[str], now: dt.datetime | None = None) -> dict[str, bytes]:
        """The data keys of these users under the current encryption key, created where missing.

        A user with an erasure request under the current key version gets none (collect drops
        their records): a request recorded after collect started is still honoured here. Two
        runs creating one user's key at once agree on the first one stored."""
        from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

        enc = keys.encryption
        kek = wrap_key(enc.material)
        when = now or dt.datetime.now(dt.UTC)
        out: dict[str, bytes] = {}
        table = data_keys_table
        erased = self._erased(enc.version)  # read now: a request made since collect started counts
        for chunk in _chunks(sorted(set(fingerprints))):
            with self.engine.begin() as conn:
                stored = dict(conn.execute(select(table.c.fingerprint, table.c.wrapped_key).where(
                    table.c.key_version == enc.version, table.c.fingerprint.in_(chunk))).all())
                fresh = {fp: os.urandom(32) for fp in chunk if fp not in stored and fp not in erased}
                if fresh:
                    mine = {fp: aes_key_wrap(kek, dek) for fp, dek in fresh.items()}
                    _insert_if_absent(conn, [{"key_version": enc.version, "fingerprint": fp, "wrapped_key": w,
                                              "created_at": when} for fp, w in mine.items()])
                    won = dict(conn.execute(select(table.c.fingerprint, table.c.wrapped_key).where(
                        table.c.key_version == enc.version, table.c.fingerprint.in_(list(fresh)))).all())
                    for fp, wrapped in won.items():
                        if bytes(wrapped) == mine[fp]:
                            out[fp] = fresh[fp]
                        else:  # another run stored this user's key first
                            stored[fp] = wrapped
            for fp, wrapped in stored.items():
                if fp not in erased:
                    out[fp] = aes_key_unwrap(kek, bytes(wrapped))
        return out

    def lookup(self, keys: KeyRing, version: str, fingerprints: Iterable[str]) -> dict[str, bytes]:
        """The data keys that still exist among these (of encryption key ``version``)."""
        from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

        key = keys.encryption_keys.get(version)
        if key is None:
            raise ConfigurationError(f"data keys of encryption key version {version} are wrapped under a key the "
                                     "key document does not hold: restore that key version")
        kek = wrap_key(key.material)
        out: dict[str, bytes] = {}
        table = data_keys_table
        with self.engine.connect() as conn:
            for chunk in _chunks(sorted(set(fingerprints))):
                for fp, wrapped in conn.execute(select(table.c.fingerprint, table.c.wrapped_key).where(
                        table.c.key_version == version, table.c.fingerprint.in_(chunk))):
                    out[fp] = aes_key_unwrap(kek, bytes(wrapped))
        return out

    def shred(self, keys: KeyRing, user_ids: Iterable[str]) -> int:
        """Delete the users' data keys under every encryption key version of the key document;
        the number deleted."""
        pairs = [(v, fingerprint(k.material, u)) for u in set(user_ids) for v, k in keys.encryption_keys.items()]
        table = data_keys_table
        with self.engine.begin() as conn:
            deleted = sum(conn.execute(delete(table).where(tuple_(table.c.key_version, table.c.fingerprint)
                                                           .in_(pairs[i:i + CHUNK]))).rowcount
                          for i in range(0, len(pairs), CHUNK))
        if deleted and self.engine.dialect.name == "postgresql":
            # A deleted row stays on disk until vacuumed (the WAL and its archives keep it too:
            # keep them no longer than the data keys' backups).
            with self.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f"VACUUM {table.name}"))
        return deleted

    def erased(self, version: str, fingerprint: str) -> bool:
        """Whether this user (fingerprint under ``version``) asked to be erased."""
        return fingerprint in self._erased(version)

    def count(self) -> int:
        from sqlalchemy import func

        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(data_keys_table)).scalar_one())


def _insert_if_absent(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING (PostgreSQL and SQLite, the ledger's databases)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise ConfigurationError(f"data keys need PostgreSQL or SQLite, not {conn.dialect.name}")
    conn.execute(insert(data_keys_table).on_conflict_do_nothing(), rows)


# ---- Spark: sealing rows -------------------------------------------------------------------

def user_keys(keys: KeyRing, store: DataKeys, user_ids: Iterable[str]) -> tuple[dict[str, tuple[str, bytes]], list[str]]:
    """The data keys of a day's users, by user id: ``{user_id: (fingerprint, key)}``, and the
    users withheld (an erasure request under the current key version: their records go)."""
    fps = {u: fingerprint(keys.encryption.material, u) for u in user_ids}
    deks = store.ensure(keys, fps.values())
    return {u: (fp, deks[fp]) for u, fp in fps.items() if fp in deks}, sorted(u for u, fp in fps.items()
                                                                              if fp not in deks)


def key_frame(spark: "SparkSession", users: dict[str, tuple[str, bytes]]) -> "DataFrame":
    """One row per user: ``user_id``, ``data_key`` (the fingerprint naming the key) and the
    binary columns of ``DEK_COLUMNS`` (the key and the pads of its synthetic-IV key). The
    keys enter the plan as data, never as literals."""
    import pyarrow as pa

    names = sorted(users)
    pads = [crypto.hmac_pads(crypto.iv_key(users[u][1])) for u in names]
    table = pa.table({
        USER_ID: pa.array(names, pa.string()),
        DATA_KEY: pa.array([users[u][0] for u in names], pa.string()),
        "dek": pa.array([users[u][1] for u in names], pa.binary()),
        "dek_iv_ipad": pa.array([p[0] for p in pads], pa.binary()),
        "dek_iv_opad": pa.array([p[1] for p in pads], pa.binary()),
    })
    return spark.createDataFrame(table)


def has_user(column: "Column") -> "Column":
    """A record with a user id to key by: one that ``privrec erase`` accepts
    (``requests.check_user_id``: 1-256 characters, no control character, no space at either
    end). Anything else in a rejected line's user id field (an object's text, a huge string
    from a hostile source) gets no key of its own: the line stays under the encryption key
    alone, and no one can grow the key table with junk ids."""
    from pyspark.sql import functions as F

    return (column.isNotNull() & F.length(column).between(1, MAX_ID_CHARS)
            & ~column.rlike(r"[\x00-\x1f\x7f]") & (F.trim(column) == column))


def seal(rows: "DataFrame", keys: "DataFrame", sealed: dict[str, tuple[str, "Column"]], *,
         broadcast: bool = True) -> "DataFrame":
    """``rows`` (with ``user_id``) with each column of ``sealed`` (name -> (AAD context, per-row
    AAD suffix)) encrypted once more under the row's user's data key, and the ``data_key``
    column naming it (NULL for a record without a user id, left under the encryption key
    alone). ``keys``: a ``key_frame``, broadcast unless too large (``BROADCAST_MAX_KEYS``).
    A row with a user id but no key fails the job rather than stay under the master key alone."""
    from pyspark.sql import functions as F

    right = keys.withColumnRenamed(USER_ID, "_dek_user")
    user = rows[USER_ID].cast("string")
    joined = rows.join(F.broadcast(right) if broadcast else right,
                       F.when(has_user(user), user) == F.col("_dek_user"), "left")
    dek = [F.col(c) for c in DEK_COLUMNS]
    missing = has_user(user) & F.col("dek").isNull()
    out = []
    for name in rows.columns:
        if name == DATA_KEY:
            continue
        if name in sealed:
            context, suffix = sealed[name]
            column = F.when(missing, F.raise_error(F.lit(f"no data key for a row's {name}")).cast("binary")) \
                .when(F.col("dek").isNotNull(), crypto.encrypt(rows[name], context, *dek, context_suffix=suffix)) \
                .otherwise(rows[name])
            out.append(column.alias(name))
        else:
            out.append(rows[name])
    return joined.select(*out, F.col(DATA_KEY))


# ---- Python: opening rows ------------------------------------------------------------------

class RowKeys:
    """Opens sealed values in Python (erasure, audits, tests): a row's data key looked up once
    per (version, fingerprint), then the two layers of ``seal`` removed."""

    def __init__(self, keys: KeyRing, store: DataKeys) -> None:
        self.keys, self.store = keys, store
        self._cache: dict[tuple[str, str], bytes | None] = {}

    def prefetch(self, pairs: Iterable[tuple[str, str | None]]) -> None:
        by_version: dict[str, set[str]] = {}
        for version, fp in pairs:
            if fp is not None and (version, fp) not in self._cache:
                by_version.setdefault(version, set()).add(fp)
        for version, fps in by_version.items():
            found = self.store.lookup(self.keys, version, fps)
            self._cache.update({(version, fp): found.get(fp) for fp in fps})

    def open(self, version: str, data_key: str | None, blob: bytes, aad: bytes) -> bytes:
        """The plaintext; ``ShreddedError`` when the row's data key was deleted, the
        ``cryptography`` library's ``InvalidTag`` when a key or the AAD is not the row's."""
        master = self.keys.encryption_keys.get(version)
        if master is None:
            raise ConfigurationError(f"a row was encrypted with key {version}, which the key document does not hold")
        if data_key is not None:
            self.prefetch([(version, data_key)])
            dek = self._cache[(version, data_key)]
            if dek is None:
                if self.store.erased(version, data_key):
                    raise ShreddedError("the row's data key was deleted (its user was erased)")
                raise DataKeyMissingError(
                    f"a row names data key {data_key[:12]}... of encryption key {version}, which the ledger database "
                    "does not hold although that user never asked to be erased: the database was lost, reset or "
                    "restored from an older backup, or is not this lake's (PRIVREC_LEDGER_URL)")
            blob = crypto.reference_decrypt(dek, blob, aad)
        return crypto.reference_decrypt(master.material, blob, aad)
