"""Prompts the inference tests and bench/batching_exactness share."""

from __future__ import annotations

# Different lengths, so a batch holds rows of different sizes.
TEXTS = [
    "Hi",
    "The river runs through the valley",
    "Please summarize the following paragraph in one sentence and explain",
    "Once upon a time",
    "Explain your reasoning step by step, then answer",
    "a b c d e f g",
    "What is the capital of France?",
    "Write a poem about the sea and the old mill by the river",
]

# A two-turn chat in ChatML whose second turn starts with the whole first (the prefix cache's case).
SYSTEM = (
    "<|im_start|>system\nYou are a careful assistant who answers questions about rivers, old mills "
    "and the sea, briefly and in plain words.<|im_end|>\n"
)
TURN_ONE = SYSTEM + "<|im_start|>user\nTell me about the tide.<|im_end|>\n<|im_start|>assistant\n"
NEXT_USER = "<|im_end|>\n<|im_start|>user\nAnd what does the moon do?<|im_end|>\n<|im_start|>assistant\n"
