"""OpenAI /v1/chat."""
