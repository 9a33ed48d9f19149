"""`phitune export gguf --check`: llama.cpp itself (through llama-cpp-python) reads the export and
is compared with phitune's PyTorch model on the run's held-out data: the chat prompt's token ids,
greedy replies token by token, and perplexity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phitune.export.gguf import require_llama_cpp
from phitune.hardware import usable_cpus


def open_llama(folder: str | Path, *, n_ctx: int = 2048, f32_cache: bool = False):
    """The export in `folder` (model.gguf, or base.gguf with adapter.gguf) loaded by llama.cpp,
    with its default f16 KV cache (what users run), or an f32 one (to compare the math exactly)."""
    require_llama_cpp("--check (it loads the export in llama.cpp)")
    import llama_cpp
    from llama_cpp import Llama

    folder = Path(folder)
    files = json.loads((folder / "phitune_export.json").read_text())["files"]
    settings: dict[str, Any] = {
        "n_ctx": n_ctx,
        "n_threads": usable_cpus(),
        "logits_all": True,
        "verbose": False,
        "seed": 0,
    }
    if f32_cache:
        settings |= {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    if "adapter" in files:
        return Llama(model_path=str(folder / files["base"]), lora_path=str(folder / files["adapter"]), **settings)
    return Llama(model_path=str(folder / files["model"]), **settings)


def llama_greedy(llm, ids: list[int], stops: list[int], max_new_tokens: int) -> list[int]:
    """llama.cpp's greedy reply to prompt `ids`, without the token that ended it."""
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in stops or len(out) == max_new_tokens:
            break
        out.append(token)
    return out


def llama_perplexity(llm, examples: list) -> float:
    """exp(mean cross-entropy) over each example's trained tokens, from llama.cpp's logits."""
    from phitune.export.verify import runtime_perplexity

    def logits_of(e):
        llm.reset()
        llm.eval(list(e.input_ids))
        return llm.scores[: len(e.input_ids)]

    return runtime_perplexity(examples, logits_of)


def check_gguf(
    output: str | Path, source: str | Path, *, data: str | None = None, prompts: int = 16, max_new_tokens: int = 32
) -> dict:
    from phitune.evaluate.lm import lm_metrics
    from phitune.export.verify import held_out, held_out_prompts, token_agreement
    from phitune.generate import greedy_ids
    from phitune.inference.prompts import end_of_turn_ids, prompt_ids
    from phitune.models import load_for_inference, merged_model

    model, tokenizer = load_for_inference(str(source))
    if hasattr(model, "merge_and_unload"):
        model = merged_model(model)  # the weights the export was built from
    split = held_out(Path(source), data, tokenizer)
    pairs = held_out_prompts(split, prompts)
    asked = [prompt for prompt, _ in pairs]
    examples = split.examples[:64] if split and split.examples else []
    longest = max([len(e.input_ids) for e in examples] + [len(prompt_ids(tokenizer, p)) for p in asked])
    llm = open_llama(output, n_ctx=longest + max_new_tokens + 8)
    stops = end_of_turn_ids(model, tokenizer)
    same_prompt = exact = 0
    agreement = 0.0
    right = {"torch": 0, "gguf": 0}
    answered = [answer.strip() if isinstance(answer, str) else None for _, answer in pairs]
    try:
        for prompt, answer in zip(asked, answered):
            ids = prompt_ids(tokenizer, prompt)
            text = prompt if isinstance(prompt, str) else str(tokenizer.decode(ids))
            same_prompt += llm.tokenize(text.encode(), add_bos=isinstance(prompt, str), special=True) == ids
            reference = greedy_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens)
            got = llama_greedy(llm, ids, stops, max_new_tokens)
            exact += got == reference
            agreement += token_agreement(got, reference)
            if answer is not None:  # the fine-tune's own answers, as the data gives them
                right["torch"] += str(tokenizer.decode(reference, skip_special_tokens=True)).strip() == answer
                right["gguf"] += str(tokenizer.decode(got, skip_special_tokens=True)).strip() == answer
        report = {
            "prompts": len(asked),
            "greedy_exact": exact / len(asked),
            "token_agreement": agreement / len(asked),
            "prompt_ids_equal": same_prompt / len(asked),
        }
        with_answers = sum(a is not None for a in answered)
        if with_answers:
            report |= {f"answers_exact_{k}": v / with_answers for k, v in right.items()}
        if examples:
            torch_ppl = lm_metrics(model, examples, batch_size=8, pad_id=tokenizer.pad_token_id, device=model.device)
            report |= {
                "perplexity_torch": torch_ppl["perplexity"],
                "perplexity_gguf": llama_perplexity(llm, examples),
                "held_out_examples": len(examples),
            }
            report["perplexity_change"] = report["perplexity_gguf"] / report["perplexity_torch"] - 1.0
    finally:
        llm.close()
    return report
