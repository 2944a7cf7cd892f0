"""DP aggregate statistics of a day: bounding (Spark SQL), noise (PyDP), release (ledger)."""
