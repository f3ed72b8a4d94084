"""Plain data and policy: the scheduler, the KV block manager, row and request types, seed rules.
No tensors, no asyncio, no HTTP."""
