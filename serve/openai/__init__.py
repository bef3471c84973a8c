"""OpenAI-compatible API, one folder per feature: protocol.py (wire models), serving.py (logic),
router.py (HTTP)."""
