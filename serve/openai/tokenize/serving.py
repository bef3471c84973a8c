"""Tokenize and detokenize with the served model's tokenizer and chat template, exactly as the generation
endpoints do (a chat request is rendered by the same `render_chat` and encoded by the same
`ServerState.encode`), so `count` is what a generation request's `usage.prompt_tokens` will be."""

from __future__ import annotations

from core.chat import render_chat
from core.errors import DataError
from serve.errors import OpenAIError
from serve.openai.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from serve.state import ServerState


def tokenize(state: ServerState, req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
    if req.model is not None:
        state.router.resolve(req.model)
    tokenizer = state.engine.tokenizer
    if isinstance(req, TokenizeChatRequest):
        try:
            text = render_chat(
                tokenizer,
                [m.for_template() for m in req.messages],
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
                template_kwargs=req.chat_template_kwargs,
            )
        except DataError as err:
            raise OpenAIError(400, str(err), param="messages") from None
    else:
        text = req.prompt
    ids = state.encode(text, add_special_tokens=req.add_special_tokens)
    strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=state.engine.max_model_len, tokens=ids, token_strs=strs
    )


def detokenize(state: ServerState, req: DetokenizeRequest) -> DetokenizeResponse:
    if req.model is not None:
        state.router.resolve(req.model)
    if any(not 0 <= t < state.vocab_size for t in req.tokens):
        raise OpenAIError(400, f"token ids must be in [0, {state.vocab_size})", param="tokens")
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(req.tokens))
