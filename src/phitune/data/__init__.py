"""Reading, checking, rendering and batching training data."""
