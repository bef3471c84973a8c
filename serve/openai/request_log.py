"""vLLM's request logging (`--enable-log-requests`, `--max-log-len`, `--enable-log-outputs`,
`--enable-log-deltas`) with vLLM's own `RequestLogger`, so the log lines are the ones vLLM's server writes.

Invariant: with request logging off (vLLM's default) nothing here runs; with it on, the engine's outputs
pass through unchanged and closing the wrapper closes (aborts) the engine request as before.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from serve.engine.protocol import EngineOutput

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest


class RequestLog:
    """What to log, from vLLM's parsed front-end arguments."""

    def __init__(self, args: Any) -> None:
        from vllm.entrypoints.serve.utils.request_logger import RequestLogger

        self.logger = RequestLogger(max_log_len=args.max_log_len)
        self.outputs = bool(args.enable_log_outputs)
        self.deltas = bool(args.enable_log_deltas)

    @classmethod
    def from_args(cls, args: Any) -> RequestLog | None:
        return cls(args) if getattr(args, "enable_log_requests", False) else None

    async def logged(
        self,
        request_id: str,
        prompt: tuple[str | None, list[int]],
        params: SamplingParams,
        lora: LoRARequest | None,
        outputs: AsyncGenerator[EngineOutput, None],
        streaming: bool,
    ) -> AsyncGenerator[EngineOutput, None]:
        """`outputs`, with the request logged first and (with `--enable-log-outputs`) each streamed delta
        (`--enable-log-deltas`) and each finished sequence logged as vLLM logs them."""
        self.logger.log_inputs(request_id, prompt[0], prompt[1], None, params, lora)
        text: defaultdict[int, list[str]] = defaultdict(list)
        ids: defaultdict[int, list[int]] = defaultdict(list)
        async with aclosing(outputs):
            async for out in outputs:
                if self.outputs:
                    for c in out.choices:
                        text[c.index].append(c.text)
                        ids[c.index].extend(c.token_ids)
                        if streaming and self.deltas and (c.text or c.finish_reason):
                            self.logger.log_outputs(
                                request_id,
                                c.text,
                                c.token_ids,
                                c.finish_reason,
                                is_streaming=True,
                                delta=True,
                            )
                        if c.finish_reason is not None:
                            self.logger.log_outputs(
                                request_id,
                                "".join(text[c.index]),
                                ids[c.index],
                                c.finish_reason,
                                is_streaming=streaming,
                            )
                yield out
