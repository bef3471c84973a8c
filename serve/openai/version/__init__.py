"""GET /version."""
