"""rempd's two HTTP APIs: the OpenAI-compatible serving API (TCP) and the control API (Unix socket)."""
