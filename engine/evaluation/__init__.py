"""Metrics on generated pictures, and the toy world with its oracle."""
