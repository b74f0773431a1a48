"""The decoding engine, sampling, and one strategy module per method."""
