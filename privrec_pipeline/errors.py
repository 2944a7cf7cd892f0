"""The domain exceptions of privrec. Every message names the problem and what to do."""


class PrivrecError(Exception):
    """Base class of all privrec errors."""


class ConfigurationError(PrivrecError):
    """A setting, key or connection is missing or invalid."""


class SecretsError(ConfigurationError):
    """Key material is missing, malformed or stored unsafely."""


class LandingPartitionError(PrivrecError):
    """The landing partition of a data interval is missing or empty."""


class ManifestMismatchError(PrivrecError):
    """A run's record accounting does not add up (records would have been lost)."""


class InputFormatError(PrivrecError):
    """An input file (e.g. a MovieLens export) is not in a recognised format."""


class QualityGateFailed(PrivrecError):
    """A critical data-quality expectation failed: DP statistics and training must not use the day."""


class PrivacyBudgetExceeded(PrivrecError):
    """A release would take a user's privacy loss over the policy's cap."""


class ReleaseInProgress(PrivrecError):
    """Another run holds the lease of a reserved release: it is being computed now."""


class ReleaseMismatch(PrivrecError):
    """A run would continue a reserved release with other mechanisms or parameters than reserved."""


class LeaseLost(PrivrecError):
    """A run tried to commit or fail a release whose lease another run now holds."""


class LedgerIntegrityError(PrivrecError):
    """The privacy ledger was edited outside privrec: its hash chain or its rows do not verify."""
