"""State shared across gateway replicas: the link to Redis that global rate limits (resilience/)
and the cross-replica drift merge (drift/) go through."""
