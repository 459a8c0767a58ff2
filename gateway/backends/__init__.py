"""Clients for the servers infergate forwards to."""
