"""batchserve: dynamic-batching inference server for Logit Diff Amplification."""

__version__ = "0.1.0"
