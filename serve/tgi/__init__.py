"""Text Generation Inference's API (`/generate`, `/generate_stream`, `/`, `/info`), for clients migrating
from TGI, on the same generation pipeline as the OpenAI endpoints."""
