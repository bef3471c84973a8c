"""OpenAI /v1/completions."""
