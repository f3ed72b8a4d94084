"""Tensors only: model loading, the runner (one forward per model per step), paged attention,
sampling and log-probabilities."""
