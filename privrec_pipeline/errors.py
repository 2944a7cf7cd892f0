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
