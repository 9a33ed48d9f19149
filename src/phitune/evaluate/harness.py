"""`phitune eval MODEL --harness TASKS`: EleutherAI's lm-evaluation-harness on our model.

The harness owns the benchmarks (prompts, few-shot, metrics); we hand it the model already
loaded: base + adapter merged in memory (the same weights `phitune merge` writes), with its
tokenizer. Standard tasks fetch their data from the Hugging Face hub unless it is cached; tasks
of your own (a YAML over local files) come in with `--harness-include DIR`.
"""

from __future__ import annotations

import logging

from phitune.errors import PhituneError

log = logging.getLogger("phitune")


def run_harness(
    base: str,
    adapter: str | None,
    tasks: list[str],
    *,
    include: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    chat_template: bool = False,
) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise PhituneError("--harness needs lm-evaluation-harness: pip install 'phitune[harness]'") from exc
    from phitune.evaluate.runner import _device, _dtype
    from phitune.models import load_for_inference

    manager = TaskManager(include_path=include) if include else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise PhituneError(
            f"--harness: unknown task(s) {', '.join(unknown)}; list them with `lm-eval ls tasks`"
            + ("" if include else ", or add your own task YAML with --harness-include DIR")
        )
    model, tokenizer = load_for_inference(base, adapter, dtype=_dtype(), device=_device())
    if adapter:
        model = model.merge_and_unload()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device()))
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=limit,
            num_fewshot=num_fewshot,
            task_manager=manager,
            apply_chat_template=chat_template,
            log_samples=False,
        )
    except (ConnectionError, OSError) as exc:
        raise PhituneError(
            f"--harness: {str(exc).splitlines()[0]}; the task's data must be available locally "
            "(cached, or a task YAML over local files with --harness-include)"
        ) from exc
    return {
        task: {k: v for k, v in values.items() if isinstance(v, (int, float)) and k != "alias"}
        for task, values in (out or {}).get("results", {}).items()
    }
