"""No task preset: the data format decides the samples (chat, prompt/completion, text, preference,
...), and the held-out perplexity judges the run."""

from phitune.tasks.base import Task

TASK = Task("none", preference=True)
