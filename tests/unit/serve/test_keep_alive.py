"""`with_keep_alive` (vLLM's `--sse-keep-alive-interval`): comments while a stream is idle, frames unchanged
and in order, and the inner stream closed when the response is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from serve.openai.pipeline import KEEP_ALIVE_FRAME, with_keep_alive


def test_idle_gaps_get_keep_alive_comments_and_frames_pass_unchanged() -> None:
    async def frames() -> AsyncGenerator[bytes, None]:
        yield b"data: 1\n\n"
        await asyncio.sleep(0.35)
        yield b"data: 2\n\n"
        yield b"data: [DONE]\n\n"

    async def run() -> list[bytes]:
        return [frame async for frame in with_keep_alive(frames(), 0.1)]

    out = asyncio.run(run())
    assert [f for f in out if f != KEEP_ALIVE_FRAME] == [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    assert 2 <= out.count(KEEP_ALIVE_FRAME) <= 4
    assert out.index(KEEP_ALIVE_FRAME) == 1  # only between frames, never before the first one came due


def test_closing_the_response_closes_the_inner_stream() -> None:
    closed = asyncio.Event()

    async def frames() -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(30)
            yield b"never"
        finally:
            closed.set()

    async def run() -> bool:
        stream = with_keep_alive(frames(), 0.05)
        assert await stream.__anext__() == b"data: 1\n\n"
        assert await stream.__anext__() == KEEP_ALIVE_FRAME
        await stream.aclose()
        return closed.is_set()

    assert asyncio.run(run())
