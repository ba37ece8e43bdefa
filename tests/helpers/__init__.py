"""Test-only helpers (importable from the tests as ``helpers.<module>``)."""
