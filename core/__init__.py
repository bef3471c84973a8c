"""Shared contracts of the stack: settings, errors, artifacts, model loading, chat templates.

Invariant: nothing in `core` imports FastAPI or vLLM, so the toolchain and the trainer can use it in an
environment that has neither.
"""
