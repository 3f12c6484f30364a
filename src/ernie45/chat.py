"""Text in, text out on top of ``ernie45.generation``: streamed replies and a multi-turn chat.

Streaming decodes all new tokens so far after each step and writes only the new characters.
NOTE: a byte-level BPE token can end in the middle of a UTF-8 character; such a piece decodes
to U+FFFD and is held back until the next token completes it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .generation import default_special_ids, stream_tokens
from .models.linear import prepacked_weights

CHAT_END_TOKEN = "<|end_of_sentence|>"  # closes each assistant turn in ERNIE's chat template


def stream_text(model, tokenizer, prompt_ids: list[int], write: Callable[[str], None], **generate_kwargs) -> str:
    """Continue one prompt, passing each new piece of text to ``write`` as it comes; return the whole reply."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token of text")
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)  # [1,P]
    new_ids: list[int] = []
    shown = ""
    for token in stream_tokens(model, input_ids, **generate_kwargs):
        new_ids.append(int(token[0]))
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            write(text[len(shown) :])
            shown = text
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    write(text[len(shown) :])
    return text


def chat_end_ids(model, tokenizer) -> list[int]:
    """The model's end tokens plus the chat template's end-of-turn token, when the tokenizer has one."""
    end_ids, _ = default_special_ids(model)
    extra = [tokenizer.eos_token_id]
    if CHAT_END_TOKEN in tokenizer.get_vocab():
        extra.append(tokenizer.convert_tokens_to_ids(CHAT_END_TOKEN))
    return end_ids + [i for i in extra if i is not None and i not in end_ids]


END_COMMANDS = ("/exit", "/quit")


def length_warning(model, prompt_len: int, max_new_tokens: int) -> str | None:
    """What to say when prompt + new tokens run past ``max_position_embeddings`` (as transformers warns):
    positions the model never saw in training, where its output may degrade."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None or prompt_len + max_new_tokens <= limit:
        return None
    fix = f"pass --max-new-tokens {limit - prompt_len} or less" if prompt_len < limit else "shorten the prompt"
    return (
        f"the prompt ({prompt_len} tokens) + --max-new-tokens {max_new_tokens} = {prompt_len + max_new_tokens} positions "
        f"pass the model's max_position_embeddings={limit}; the output may degrade beyond it: {fix}"
    )


def chat(
    model,
    tokenizer,
    read: Callable[[], str | None],
    write: Callable[[str], None],
    warn: Callable[[str], None] | None = None,
    **generate_kwargs,
) -> list[dict[str, str]]:
    """A multi-turn chat: ``read`` gives the next user message (None, a blank line, /exit or /quit
    ends it); returns the messages.

    Every turn re-encodes the whole conversation with the tokenizer's chat template. ``warn`` is
    told once when the conversation + ``max_new_tokens`` outgrows the model's positions.
    """
    messages: list[dict[str, str]] = []
    end_ids = chat_end_ids(model, tokenizer)
    with prepacked_weights(model):  # NOTE: one block for the whole conversation
        while (user := (read() or "").strip()) and user not in END_COMMANDS:
            messages.append({"role": "user", "content": user})
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
            notice = length_warning(model, len(prompt_ids), generate_kwargs.get("max_new_tokens", 0))
            if warn is not None and notice:
                warn(notice)
                warn = None  # NOTE: the conversation only grows; once is enough
            write("Assistant: ")
            reply = stream_text(model, tokenizer, prompt_ids, write, eos_token_id=end_ids, **generate_kwargs)
            write("\n")
            messages.append({"role": "assistant", "content": reply.strip()})
    return messages
