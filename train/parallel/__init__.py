"""Parallelism applied from outside the model: each builds a rank's model parts for the one training loop."""
