"""Right to erasure: requests (``requests``), removal of a user's rows from every zone (``apply``)."""
