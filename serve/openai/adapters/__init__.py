"""Runtime adapter management: POST /v1/adapters, DELETE /v1/adapters/{name}, GET /v1/adapters."""
