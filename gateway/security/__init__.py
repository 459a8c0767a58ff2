"""Edge security: TLS on listeners and to backends, caller identity, and access rules."""
