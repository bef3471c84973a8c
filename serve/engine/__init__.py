"""Engines behind the server: the `Engine` protocol and its vLLM implementation."""
