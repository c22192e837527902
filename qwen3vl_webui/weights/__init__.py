"""Weights: loading a checkpoint in a precision, the demo checkpoint, random weights for benchmarks, the chat template."""
