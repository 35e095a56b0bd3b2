"""Test doubles of engine parts, for unit tests and benchmarks (never used in serving)."""
