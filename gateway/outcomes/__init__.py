"""Outcomes: what happened after a prediction. Callers post labels and business outcomes for
earlier requests; the join store pairs them with what the gateway remembered of the prediction,
for online quality, sequential A/B tests between versions, per-segment reports and retrain signals."""
