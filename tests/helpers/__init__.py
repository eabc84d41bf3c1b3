"""Test helpers (reference implementations run in subprocesses, fixtures)."""
