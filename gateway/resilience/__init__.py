"""Protecting backends and callers: rate limits (and, with the rest of issue #4, breakers,
concurrency caps, shedding and retry budgets)."""
