"""State the gateway's replicas share through Redis: the connection, the route state store, the
rollout leader lease (docs/scaling.md), and the async link that global rate limits (resilience/)
and the cross-replica drift merge (drift/) use.
"""
