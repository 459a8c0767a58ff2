"""Metrics, and later traces and structured logs."""
