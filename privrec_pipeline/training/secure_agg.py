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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privrec_pipeline.errors import PrivrecError

FRACTION_BITS = 24  # fixed-point resolution 2^-24 (about 6e-8) per coordinate
_LIMIT = 2.0**62  # |sum| must stay below 2^63 after adding up to this many partitions' values


class SecureAggregationError(PrivrecError):
    """A round cannot be aggregated (a partition is missing, or values overflow the encoding)."""


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
    flat = np.asarray(update, dtype=np.float64).ravel()
    encoded = encode(flat, len(public_keys), fraction_bits)
    return encoded + pairwise_mask(keys, public_keys, run_id, round_index, flat.size)


def aggregate(masked: dict[int, np.ndarray], partitions: int, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """Sum of the partitions' updates, from their masked vectors only. Every partition must be
    present: without one, the masks do not cancel and nothing is decoded (fail closed)."""
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
