"""The training's DP randomness (Poisson sampling of users, Gaussian noise) from a CSPRNG.

``SecureRandom`` is the ChaCha20 keystream (RFC 8439, through the ``cryptography`` package)
of a 256-bit key derived with HKDF-SHA256 (RFC 5869) from the partition's secret and
(run, round, partition). It is deterministic given the key, so a retried partition task
draws the same users and the same noise and writes the same update, and unpredictable
without the partition's secret (ChaCha20 is a PRF: without the key its output cannot be
told from uniform bits), unlike a Mersenne Twister whose state can be recovered from its
outputs. Each key serves one stream only, so the nonce is fixed.

Uniform doubles take the top 53 bits of a 64-bit keystream word (every double in the output
grid is equally likely). Gaussian samples: Box-Muller (Box & Muller 1958) on pairs of such
doubles, and, against the floating-point attacks on noise (Mironov 2012, "On Significance of
the Least Significant Bits for Differential Privacy", CCS; for Gaussian samplers, Jin et al.
2022, "Are We There Yet? Timing and Floating-Point Attacks on Differential Privacy Systems",
S&P), each standard normal is the sum of 2n = 4 independent draws divided by 2, the mitigation
of Holohan & Braghin 2021 ("Secure Random Sampling in Differential Privacy", ESORICS,
section 5.1) that Opacus' ``secure_mode`` uses (``opacus/optimizers/optimizer.py``,
``_generate_noise``, n = 2): telling which noise value produced an observed float then means
searching about 2^(53 (2n - 1)) = 2^159 combinations of draws instead of 2^53.

What remains (as in Opacus): the mitigation is a heuristic against the known attacks, not a
proof that the floating-point mechanism is DP (Mironov's snapping mechanism proves that for
Laplace noise only); the Gaussian draws are float64, added to the float64 gradient sum and
rounded once to float32, and what leaves a partition is a function of these values after
the optimizer and the secure aggregation's fixed-point encoding (post-processing).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECURE_DRAWS = 4  # 2n with n = 2 (Holohan & Braghin 2021, section 5.1; Opacus secure_mode)
_UNIT = 2.0**-53


class SecureRandom:
    """A deterministic, unpredictable random stream: the ChaCha20 keystream of ``key``."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError(f"SecureRandom needs a 32-byte key, got {len(key)} bytes")
        self._encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()

    @classmethod
    def derive(cls, secret: bytes, purpose: str, run_id: str, round_index: int, partition: int) -> SecureRandom:
        """The stream of one (purpose, run, round, partition), keyed by the partition's secret."""
        info = f"privrec-train-{purpose}|{run_id}|{round_index}|{partition}".encode()
        return cls(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret))

    def __repr__(self) -> str:  # never shows the key
        return "SecureRandom(ChaCha20)"

    def words(self, n: int) -> np.ndarray:
        """The next ``n`` keystream words as uint64 (little-endian, whatever the platform)."""
        return np.frombuffer(self._encryptor.update(b"\x00" * (8 * n)), dtype="<u8").astype(np.uint64, copy=False)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` doubles uniform on the grid {0, 2^-53, ..., 1 - 2^-53} (53 random bits each)."""
        return (self.words(n) >> np.uint64(11)).astype(np.float64) * _UNIT

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """``n`` independent Bernoulli(p) draws (Poisson sampling of users with rate ``p``)."""
        return self.uniform(n) < p

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` N(0, 1) samples, each the sum of ``SECURE_DRAWS`` Box-Muller draws / sqrt(draws);
        one keystream call for all of them (the float64 arithmetic in torch, vectorized)."""
        pairs = SECURE_DRAWS // 2 * n
        bits = torch.from_numpy((self.words(2 * pairs) >> np.uint64(11)).view(np.int64))  # < 2^53: exact
        u1 = (bits[:pairs] + 1).double() * _UNIT  # (0, 1]: log(u1) is finite
        angle = bits[pairs:].double() * (2.0 * math.pi * _UNIT)  # [0, 2 pi)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        draws = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)]).reshape(SECURE_DRAWS, n)
        return (draws.sum(dim=0) / math.sqrt(SECURE_DRAWS)).numpy()
