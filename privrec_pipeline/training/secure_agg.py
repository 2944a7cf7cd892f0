"""Secure aggregation of partition updates with pairwise masks (privacy contract point 6).

The protocol of Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS), without the dropout recovery (a missing partition fails the round):

1. Each partition k holds a secret of its own and derives an X25519 key pair per
   (run, round) from it (HKDF-SHA256, RFC 5869), so a retried task derives the same pair.
   It publishes only the public key.
2. For every other partition j, k computes the X25519 shared secret (RFC 7748) and expands it
   with HKDF into a ChaCha20 key for (run, round, {j, k}); the keystream is the mask
   m_jk, a vector of uint64.
3. k encodes its update in fixed point (``round(x * 2^f)``, two's complement) modulo 2^64
   and adds ``+m_kj`` for j > k and ``-m_jk`` for j < k. Every mask appears once with each
   sign across the partitions, so the masks cancel in the sum modulo 2^64.
4. The aggregator adds the masked vectors modulo 2^64 and decodes the sum. It never sees a
   single partition's update: each masked vector is the update plus a uniformly random
   vector (a one-time pad over Z_2^64), statistically independent of the update.

If any partition's masked vector is missing, the sum is a random vector; ``aggregate``
refuses to decode it (the round fails closed).

Who takes part (the roster). Public keys travel through the lake, which more people can
write than should decide who is in a round. So, after every partition published its keys,
the orchestrator (not a partition) seals a ``Roster``: the run and, per partition, the
SHA-256 fingerprint of each round's public key. Its digest (SHA-256 of the roster file's
bytes) goes to the tasks through the orchestrator's own database (Airflow XCom), not through
the lake. Partitions and the aggregator check the roster file against that digest, every
public key against the roster, a partition's own secret against its sealed key (a secret
replaced after publishing derives other keys: its masks would not cancel), and every masked
update's metadata (partition, round, run, key fingerprint, roster digest, length) before
summing. At least ``MIN_PARTIES`` (2) parties are required: one party's "masked" update
would be its update, in the clear for the aggregator. A masked update is written once per
(run, round, partition) and never replaced: two different vectors under the same masks
would give the aggregator their difference in the clear.

Trust model. The aggregator is honest but curious: it follows the protocol and learns only
the sum of the P updates (and what the global models reveal, which are DP by the plan).
Partitions follow the protocol: a masked update is uniformly random, so its norm or range
cannot be checked, and a dishonest partition can poison the sum (any update within the
fixed-point range, or in distributed mode an update without its noise share). Whoever can
write the orchestrator's database, or read a partition's secret on its worker, is outside
the model; a writer of the lake can make a round fail, not change who takes part unnoticed.
An aggregator colluding with P - 1 partitions learns the remaining one's update (pairwise
masks hide an update only from parties that do not hold its pair keys).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privrec_pipeline.errors import PrivrecError

FRACTION_BITS = 24  # fixed-point resolution 2^-24 (about 6e-8) per coordinate
_LIMIT = 2.0**62  # |sum| must stay below 2^63 after adding up to this many partitions' values
MIN_PARTIES = 2  # pairwise masking hides an update only among at least two parties


class SecureAggregationError(PrivrecError):
    """A round cannot be aggregated (a partition is missing, or values overflow the encoding)."""


def require_parties(parties: int) -> None:
    """Masking needs two parties at least; one party's masked update is its update in the clear."""
    if parties < MIN_PARTIES:
        raise SecureAggregationError(
            f"secure aggregation needs at least {MIN_PARTIES} partitions, got {parties}: a single party's "
            "update would be visible to the aggregator (there is nobody to share masks with). Set "
            f"PRIVREC_TRAIN_PARTITIONS to {MIN_PARTIES} or more (build_partitions then splits the users into "
            "that many disjoint partitions; in local mode each partition's update is DP by itself)")


def fingerprint(public: bytes) -> str:
    """SHA-256 (FIPS 180-4) of a raw X25519 public key, hex: what the roster records."""
    return hashlib.sha256(public).hexdigest()


def _short(digest: str) -> str:
    return digest[:16]


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


@dataclass(frozen=True)
class RoundKeys:
    """One partition's X25519 key pair for one (run, round). ``repr`` hides the private key."""

    partition: int
    private: X25519PrivateKey

    @classmethod
    def derive(cls, partition_secret: bytes, run_id: str, round_index: int, partition: int) -> "RoundKeys":
        seed = _hkdf(partition_secret, f"privrec-secagg-key|{run_id}|{round_index}|{partition}".encode())
        return cls(partition, X25519PrivateKey.from_private_bytes(seed))

    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def __repr__(self) -> str:
        return f"RoundKeys(partition={self.partition})"


def _mask(shared: bytes, context: bytes, size: int) -> np.ndarray:
    key = _hkdf(shared, b"privrec-secagg-mask|" + context)
    # ChaCha20 keystream (RFC 8439) as the pseudo-random pad; the nonce is fixed because each
    # key is used for exactly one vector.
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\x00" * (8 * size)), dtype=np.uint64).copy()


def pairwise_mask(keys: RoundKeys, public_keys: dict[int, bytes], run_id: str, round_index: int,
                  size: int) -> np.ndarray:
    """The sum of this partition's signed pairwise masks (uint64, modulo 2^64)."""
    total = np.zeros(size, dtype=np.uint64)
    me = keys.partition
    for other, public in sorted(public_keys.items()):
        if other == me:
            continue
        shared = keys.private.exchange(X25519PublicKey.from_public_bytes(public))
        low, high = sorted((me, other))
        mask = _mask(shared, f"{run_id}|{round_index}|{low}|{high}".encode(), size)
        total = total + mask if me == low else total - mask  # uint64 arithmetic wraps modulo 2^64
    return total


def encode(values: np.ndarray, parties: int, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """Fixed point modulo 2^64 (two's complement); refuses values whose sum could overflow."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * 2.0**fraction_bits)
    if not np.all(np.isfinite(scaled)) or np.abs(scaled).max(initial=0.0) * parties >= _LIMIT:
        raise SecureAggregationError(
            f"update values out of range for {fraction_bits}-bit fixed point with {parties} partitions "
            f"(largest |value| {np.abs(values).max(initial=0.0):.3g})")
    return scaled.astype(np.int64).view(np.uint64)


def decode(total: np.ndarray, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    return total.view(np.int64).astype(np.float64) / 2.0**fraction_bits


def mask_update(update: np.ndarray, keys: RoundKeys, public_keys: dict[int, bytes], run_id: str,
                round_index: int, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """What partition ``keys.partition`` hands to the aggregator: encoded update + its masks."""
    require_parties(len(public_keys))
    flat = np.asarray(update, dtype=np.float64).ravel()
    encoded = encode(flat, len(public_keys), fraction_bits)
    return encoded + pairwise_mask(keys, public_keys, run_id, round_index, flat.size)


def aggregate(masked: dict[int, np.ndarray], partitions: int, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """Sum of the partitions' updates, from their masked vectors only. Every partition must be
    present: without one, the masks do not cancel and nothing is decoded (fail closed)."""
    require_parties(partitions)
    missing = sorted(set(range(partitions)) - set(masked))
    if missing:
        raise SecureAggregationError(
            f"masked updates of partition(s) {missing} are missing: the round fails closed, nothing is unmasked")
    sizes = {v.size for v in masked.values()}
    if len(sizes) != 1:
        raise SecureAggregationError(f"masked updates differ in length: {sorted(sizes)}")
    total = np.zeros(sizes.pop(), dtype=np.uint64)
    for k in range(partitions):
        total = total + masked[k]
    return decode(total, fraction_bits)


@dataclass(frozen=True)
class Roster:
    """Who takes part in a run: per partition, the fingerprint of each round's public key.
    Sealed once by the orchestrator; its ``digest`` reaches the tasks outside the lake."""

    run_id: str
    keys: dict[int, tuple[str, ...]]  # partition -> fingerprint per round

    @classmethod
    def seal(cls, run_id: str, public_keys: dict[int, list[bytes]]) -> "Roster":
        require_parties(len(public_keys))
        if sorted(public_keys) != list(range(len(public_keys))):
            raise SecureAggregationError(f"partitions must be 0..{len(public_keys) - 1}, got {sorted(public_keys)}")
        rounds = {len(v) for v in public_keys.values()}
        if len(rounds) != 1:
            raise SecureAggregationError(f"partitions published keys for different numbers of rounds: {sorted(rounds)}")
        return cls(run_id, {k: tuple(fingerprint(p) for p in v) for k, v in public_keys.items()})

    @property
    def partitions(self) -> int:
        return len(self.keys)

    @property
    def rounds(self) -> int:
        return len(self.keys[0])

    def to_bytes(self) -> bytes:
        doc = {"run_id": self.run_id, "keys": {str(k): list(v) for k, v in sorted(self.keys.items())}}
        return json.dumps(doc, indent=2, sort_keys=True).encode("utf-8")

    @staticmethod
    def digest_of(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def verified(cls, data: bytes, digest: str, source: str) -> "Roster":
        """The roster in ``data`` if its SHA-256 is the sealed ``digest``; else fail closed."""
        actual = cls.digest_of(data)
        if actual != digest:
            raise SecureAggregationError(
                f"{source} does not match the roster sealed for this run (sha256 {_short(actual)}..., sealed "
                f"{_short(digest)}...): it was changed in the lake after seal_keys. The round fails closed; find "
                "out who wrote it, then train again in a new run")
        doc = json.loads(data)
        return cls(doc["run_id"], {int(k): tuple(v) for k, v in doc["keys"].items()})

    def sealed(self, partition: int, round_index: int) -> str:
        if partition not in self.keys or not 0 <= round_index < self.rounds:
            raise SecureAggregationError(
                f"the roster has no key for partition {partition}, round {round_index} "
                f"({self.partitions} partitions, {self.rounds} rounds)")
        return self.keys[partition][round_index]

    def check_public(self, partition: int, round_index: int, public: bytes, source: str) -> None:
        """A public key read from the lake is the one sealed for (partition, round)."""
        actual, sealed = fingerprint(public), self.sealed(partition, round_index)
        if actual != sealed:
            raise SecureAggregationError(
                f"the public key of partition {partition} for round {round_index} in {source} is not the sealed "
                f"one (fingerprint {_short(actual)}..., sealed {_short(sealed)}...): the key file was replaced "
                "after seal_keys. The round fails closed; find out who wrote it, then train again in a new run")

    def check_own(self, keys: RoundKeys, round_index: int, hint: str = "") -> None:
        """This worker's secret derives the key sealed for its partition (before masking)."""
        actual, sealed = fingerprint(keys.public_bytes()), self.sealed(keys.partition, round_index)
        if actual != sealed:
            raise SecureAggregationError(
                f"partition {keys.partition}'s secret on this worker derives another public key for round "
                f"{round_index} than the sealed one (fingerprint {_short(actual)}..., sealed {_short(sealed)}...): "
                "the secret changed after publish_keys (a retry on another worker, or a lost secret), so its "
                f"masks would not cancel. {hint}".rstrip())


MASKED_FIELDS = ("partition", "round", "run_id", "key_fingerprint", "roster_digest", "size")


@dataclass(frozen=True)
class MaskedUpdate:
    """A masked vector and what the aggregator checks before adding it (one .npz file)."""

    partition: int
    round: int
    run_id: str
    key_fingerprint: str
    roster_digest: str
    masked: np.ndarray

    def digest(self) -> str:
        """SHA-256 of the content (metadata and vector), independent of the file's bytes."""
        import hashlib

        head = f"{self.partition}|{self.round}|{self.run_id}|{self.key_fingerprint}|{self.roster_digest}|"
        return hashlib.sha256(head.encode("utf-8") + np.ascontiguousarray(self.masked).tobytes()).hexdigest()

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, masked=self.masked, partition=np.int64(self.partition), round=np.int64(self.round),
                 run_id=np.str_(self.run_id), key_fingerprint=np.str_(self.key_fingerprint),
                 roster_digest=np.str_(self.roster_digest), size=np.int64(self.masked.size))
        return buffer.getvalue()

    @classmethod
    def load(cls, source, name: str) -> "MaskedUpdate":
        """Read a masked update (path or file object); ``name`` names it in errors."""
        with np.load(source, allow_pickle=False) as npz:
            missing = [f for f in ("masked", *MASKED_FIELDS) if f not in npz.files]
            if missing:
                raise SecureAggregationError(f"masked update {name} lacks {missing}: it cannot be checked, "
                                             "so it is not summed")
            masked = npz["masked"]
            if masked.dtype != np.uint64 or masked.ndim != 1 or int(npz["size"]) != masked.size:
                raise SecureAggregationError(
                    f"masked update {name} is not a vector of {int(npz['size'])} uint64 values "
                    f"({masked.dtype}, shape {masked.shape})")
            return cls(int(npz["partition"]), int(npz["round"]), str(npz["run_id"]), str(npz["key_fingerprint"]),
                       str(npz["roster_digest"]), masked)

    def check(self, roster: Roster, roster_digest: str, partition: int, round_index: int, size: int,
              name: str) -> None:
        """Fail unless this is partition's update of this round and run, masked with its sealed
        key under this roster, and as long as the model."""
        expected = {"partition": partition, "round": round_index, "run_id": roster.run_id,
                    "key_fingerprint": roster.sealed(partition, round_index), "roster_digest": roster_digest,
                    "size": size}
        actual = {"partition": self.partition, "round": self.round, "run_id": self.run_id,
                  "key_fingerprint": self.key_fingerprint, "roster_digest": self.roster_digest,
                  "size": self.masked.size}
        wrong = [f"{k} {actual[k]!r} (expected {expected[k]!r})" for k in MASKED_FIELDS if actual[k] != expected[k]]
        if wrong:
            raise SecureAggregationError(f"masked update {name} is rejected: {'; '.join(wrong)}")
