"""The HTTP layer: Starlette routes (native LDA and /v1 OpenAI), SSE streaming, request bodies and
security, uvicorn set-up, the command line and the Ray Serve deployment. No tensors here."""
