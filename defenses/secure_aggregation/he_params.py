"""Parameters for addition-only homomorphic aggregation (TenSEAL: BFV or CKKS).

A secure sum never multiplies ciphertexts, so it needs no multiplicative depth:
one data prime (plus the key-switching prime TenSEAL insists on) is enough. The
usual choice (poly degree 8192, moduli [60, 40, 40], scale 2^40, NVFLARE's
HEBuilder) pays for two levels a sum never uses.

Security: the HomomorphicEncryption.org standard (Albrecht et al. 2018), 128-bit
classical security, ternary secret, gives the largest total log2(q) per poly
degree N (:data:`MAX_LOG_Q`). :meth:`HEParams.validate` refuses anything above it
with a :class:`~secfed.errors.ConfigError` (SEAL enforces the same table).

Default (:data:`DEFAULT`), measured in ``benchmarks/he.py``: quantised BFV,
N = 4096, moduli [60, 40] (100 <= 109 bits), a 48-bit batching prime t. Each
ciphertext holds N = 4096 integers (CKKS holds N/2 reals), its data level is one
60-bit prime, so a parameter costs 2 * 60 / 8 = 15 bytes plus framing (NVFLARE's
CKKS: about 57). Integer addition is exact, so the only error is quantisation:
each client rounds ``w_i * delta_i / step`` to the nearest integer with
``step = max_value / L`` and ``L = floor((t/2 - 1) / max_clients)`` levels, which
keeps the sum of up to ``max_clients`` clients inside (-t/2, t/2). The
per-coordinate error of the decrypted sum of n clients is at most ``n * step / 2``.

BFV noise: decryption is exact while the accumulated noise stays below q/(2t),
here 2^11. :meth:`HEParams.decryption_failure_log2` bounds the chance that the sum
of ``max_clients`` fresh ciphertexts crosses it (Bernstein's inequality on SEAL's
clipped-normal noise): 2^-84 per coefficient for the default at 1000 clients; the
default t is the largest whose bound is below 2^-64 (t = 49 bits gives 2^-14).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from secfed.errors import ConfigError

# HomomorphicEncryption.org standard, 128-bit classical security, ternary secret.
MAX_LOG_Q: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (bases are the first 12 primes)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def batching_prime(bits: int, poly_modulus_degree: int) -> int:
    """The largest prime t < 2^bits with t = 1 (mod 2N): BFV batching needs it (SEAL)."""
    m = 2 * poly_modulus_degree
    k = ((1 << bits) - 1) // m
    while k > 0:
        if _is_prime(k * m + 1):
            return k * m + 1
        k -= 1
    raise ConfigError(f"no {bits}-bit batching prime for poly_modulus_degree {poly_modulus_degree}")


@dataclass(frozen=True)
class HEParams:
    """One homomorphic-aggregation parameter set.

    ``scheme``: ``"bfv"`` (quantised integers, N slots, exact addition) or ``"ckks"``
    (approximate reals, N/2 slots). ``coeff_mod_bit_sizes``: TenSEAL's moduli; the
    last is the key-switching prime, so fresh ciphertexts carry all but the last.
    ``plain_modulus_bits`` (BFV): size of the batching prime t. ``scale_bits``
    (CKKS): the encoding scale 2^scale_bits. ``max_value``: public bound on each
    client's ``|w_i * delta_i[j]|`` (larger values are clipped to it and counted).
    ``max_clients``: how many ciphertexts the sum must hold without overflow.
    """

    scheme: str = "bfv"
    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    plain_modulus_bits: int = 48
    scale_bits: int = 40
    max_value: float = 32.0
    max_clients: int = 1000
    weight_frac_bits: int = 8  # the weight slot is w_i rounded to multiples of 2^-8
    _plain_modulus: int = field(default=0, compare=False, repr=False)

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree if self.scheme == "bfv" else self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def plain_modulus(self) -> int:
        if self.scheme != "bfv":
            return 0
        return self._plain_modulus or batching_prime(self.plain_modulus_bits, self.poly_modulus_degree)

    @property
    def levels(self) -> int:
        """BFV: integer levels per client, L = floor((t/2 - 1) / max_clients)."""
        return (self.plain_modulus // 2 - 1) // self.max_clients

    @property
    def step(self) -> float:
        """BFV quantisation step of a weighted coordinate."""
        return self.max_value / self.levels

    def abs_error_bound(self, n: int) -> float:
        """Worst-case per-coordinate error of the released sum of n clients.

        BFV: rounding only, n * step / 2. CKKS: half the release grid plus the decryption
        error bound (:meth:`ckks_error_bound`): the key holder rounds to the grid before release.
        """
        if self.scheme == "bfv":
            return n * self.step / 2
        return self.release_step(n) / 2 + self.ckks_error_bound(n)

    # CKKS: a fresh symmetric ciphertext at N = 4096..16384 decrypts with an error below
    # 2^(12 - scale_bits) per slot (measured about 2^(10 - scale_bits) for the sum of 10 at 2^40);
    # a sum of n adds n such errors.
    CKKS_ERROR_BITS = 12
    #: log2 of (release grid / CKKS error bound): the key holder rounds to a grid 2^10 times coarser.
    CKKS_RELEASE_BITS = 10

    def ckks_error_bound(self, n: int) -> float:
        """CKKS: a bound on |decryption error| per slot of a sum of n fresh ciphertexts."""
        return max(n, 1) * 2.0 ** (self.CKKS_ERROR_BITS - self.scale_bits)

    def release_step(self, n: int) -> float:
        """CKKS: the grid the key holder rounds the decrypted sum to (review finding 10).

        Releasing m + e (message plus decryption error) hands out e, a linear function of
        the secret key: the precondition of Li and Micciancio's key-recovery attack on
        CKKS (EUROCRYPT 2021). Rounding to a grid 2^CKKS_RELEASE_BITS times coarser than
        the error bound makes the release a function of m alone except where m lies
        within |e| of a grid midpoint (probability <= 2^(1 - CKKS_RELEASE_BITS) per slot
        for m spread over the grid). BFV decrypts exactly and needs no grid.
        """
        return self.ckks_error_bound(n) * 2.0 ** self.CKKS_RELEASE_BITS

    def decryption_failure_log2(self) -> float:
        """BFV: log2 of a bound on P[one coefficient of the sum of max_clients ciphertexts decrypts wrong].

        Decryption is exact while |noise| < q/(2t). Fresh symmetric-encryption noise per
        coefficient is SEAL's clipped normal (sigma = 3.2, |e| <= 19.2); encryption
        rounds q*m/t, adding at most 1/2 per ciphertext. Bernstein's inequality for the
        sum of n such terms: P[|S| >= a] <= 2 exp(-a^2 / (2 (n sigma^2 + 19.2 a / 3))),
        with a = q/(2t) - n/2 and q taken as 2^data_bits (SEAL picks the largest primes
        of the requested size, within 2^-20 of it).
        """
        if self.scheme != "bfv":
            return float("nan")
        n, sigma, b = self.max_clients, 3.2, 19.2
        a = 2.0 ** (self.data_bits - self.plain_modulus_bits - 1) - n / 2
        if a <= 0:
            return 0.0
        return 1 - a * a / (2 * (n * sigma ** 2 + b * a / 3)) / math.log(2)

    def raw_ciphertext_bytes(self) -> int:
        """Size of one fresh ciphertext as SEAL stores it uncompressed: 2 polys x N x data primes x 8."""
        return 2 * self.poly_modulus_degree * (len(self.coeff_mod_bit_sizes) - 1) * 8

    def validate(self, key: str = "server.secure_sum") -> "HEParams":
        """Refuse anything below 128-bit security or that cannot hold the sum. Returns a copy with t fixed."""
        if self.scheme not in ("bfv", "ckks"):
            raise ConfigError(f"config key '{key}.scheme': must be 'bfv' or 'ckks' (got {self.scheme!r})")
        n = self.poly_modulus_degree
        if n not in MAX_LOG_Q:
            raise ConfigError(f"config key '{key}.poly_modulus_degree': must be one of {sorted(MAX_LOG_Q)} (got {n})")
        bits = list(self.coeff_mod_bit_sizes)
        if len(bits) < 2 or any(not isinstance(b, int) or not 10 <= b <= 60 for b in bits):
            raise ConfigError(f"config key '{key}.coeff_mod_bit_sizes': need >= 2 primes of 10..60 bits "
                              f"(the last is the key-switching prime), got {bits}")
        if sum(bits) > MAX_LOG_Q[n]:
            raise ConfigError(f"config key '{key}.coeff_mod_bit_sizes': total {sum(bits)} bits exceeds {MAX_LOG_Q[n]}, "
                              f"the 128-bit security limit for poly_modulus_degree {n} (HomomorphicEncryption.org "
                              "standard); use fewer bits or a larger degree")
        if not 1 <= self.max_clients <= 1_000_000:
            raise ConfigError(f"config key '{key}.max_clients': must be in 1..1e6 (got {self.max_clients})")
        if not (math.isfinite(self.max_value) and self.max_value > 0):
            raise ConfigError(f"config key '{key}.max_value': must be a positive number (got {self.max_value})")
        headroom = math.log2(self.max_clients) + 1
        if self.scheme == "bfv":
            if not 17 <= self.plain_modulus_bits <= 60:
                raise ConfigError(f"config key '{key}.plain_modulus_bits': must be in 17..60 (got {self.plain_modulus_bits})")
            if self.decryption_failure_log2() > -64:
                raise ConfigError(f"config key '{key}.plain_modulus_bits': {self.plain_modulus_bits} bits leaves too "
                                  f"little noise room under a {self.data_bits}-bit data modulus for "
                                  f"{self.max_clients} clients (decryption failure bound above 2^-64)")
            t = batching_prime(self.plain_modulus_bits, n)
            p = HEParams(**{**self.__dict__, "coeff_mod_bit_sizes": tuple(bits), "_plain_modulus": t})
            if p.levels < 2 ** 8:
                raise ConfigError(f"config key '{key}.max_clients': {self.max_clients} clients leave only {p.levels} "
                                  "quantisation levels each; raise plain_modulus_bits")
            return p
        if not 10 <= self.scale_bits <= 60:
            raise ConfigError(f"config key '{key}.scale_bits': must be in 10..60 (got {self.scale_bits})")
        # The decoded sum (and the coefficient growth of the encoding) must stay below q/2.
        if self.scale_bits + math.log2(self.max_value) + headroom + 2 > self.data_bits:
            raise ConfigError(f"config key '{key}.scale_bits': 2^{self.scale_bits} * max_value * max_clients "
                              f"overflows the {self.data_bits}-bit data modulus; lower scale_bits or max_value")
        return HEParams(**{**self.__dict__, "coeff_mod_bit_sizes": tuple(bits)})


DEFAULT = HEParams()
"""secfed's default: quantised BFV, N=4096, moduli [60, 40], t a 48-bit prime (the largest with
a decryption-failure bound below 2^-64 per coefficient at 1000 clients)."""

NVFLARE = HEParams(scheme="ckks", poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40), scale_bits=40,
                   max_value=1024.0)
"""NVFLARE's HEBuilder parameters (CKKS, N=8192, [60, 40, 40], scale 2^40), for comparison."""
