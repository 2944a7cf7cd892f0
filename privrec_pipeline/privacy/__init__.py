"""Privacy accounting: mechanisms as data, tight composition, and the persistent ledger."""
