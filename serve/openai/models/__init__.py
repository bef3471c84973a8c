"""OpenAI /v1/models."""
