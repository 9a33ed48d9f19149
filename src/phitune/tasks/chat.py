"""A chatbot: conversations in any chat-like format, scored by the overlap of its generated
replies with the reference replies (ROUGE-L, exact match)."""

from phitune.tasks.base import Task

TASK = Task(
    "chat",
    formats=("chat", "sharegpt", "prompt_completion", "alpaca"),
    metrics=("rouge_l", "exact_match"),
    generative=True,
    primary="rouge_l",
    preference=True,
)
