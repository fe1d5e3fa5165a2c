"""Fault injection and webhook storms against the real stack (see docs/reliability.md)."""
