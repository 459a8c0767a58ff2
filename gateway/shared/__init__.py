"""State the gateway's replicas share through Redis: the connection, the route state store and
the rollout leader lease (docs/scaling.md)."""
