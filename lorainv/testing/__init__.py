"""Reusable testing tools: the Hypothesis state machine, strategies and the pytest plugin."""
