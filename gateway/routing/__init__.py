"""Which target serves each request: the compiled route table, splits, shadows, rollouts and
the live state behind them."""
