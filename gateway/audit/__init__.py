"""Audit: trace-linked, hash-chained, signed records of every request."""
