"""The OpenAI-compatible fine-tuning service: `phitune serve` (FastAPI), `phitune worker`."""
