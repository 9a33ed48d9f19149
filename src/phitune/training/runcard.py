"""OUT/README.md: what was trained, on what, how, and how well."""

from __future__ import annotations

from pathlib import Path

from phitune.config import Config, dump_config
from phitune.methods.lora import LoraFamilySettings


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_run_card(out: Path, cfg: Config, summary: dict) -> None:
    artifact = Path(summary["artifact"]).name
    ev = summary.get("eval") or {}
    lines = [
        f"# phitune run: {cfg.method.name} on {cfg.model.name_or_path}",
        "",
        f"- base model: `{cfg.model.name_or_path}`",
        f"- method: `{cfg.method.name}`"
        + (
            f" (r={cfg.method.r}, alpha={cfg.method.alpha}, targets={cfg.method.target_modules})"
            if isinstance(cfg.method, LoraFamilySettings)
            else ""
        ),
        f"- data: train `{cfg.data.train}` ({summary['train_examples']} examples, {summary['truncated_examples']} "
        "truncated)" + (f", validation `{cfg.data.validation}`" if cfg.data.validation else ""),
        f"- trainable parameters: {summary['trainable_parameters']:,}; weights in memory: "
        f"{summary['weight_memory_mb']} MB",
        f"- steps: {summary['steps']}, trained tokens: {summary['trained_tokens']:,}, time: {summary['elapsed_s']} s",
        f"- objective: {summary['objective']}"
        + (f", task: {summary['task']} (OUT/task.json)" if summary["task"] != "none" else ""),
        f"- final train loss: {_fmt(summary['final_train_loss'])}",
    ]
    if ev:
        lines.append("- validation: " + ", ".join(f"{k} {_fmt(v)}" for k, v in ev.items()))
    lines += [
        "",
        "## Load it",
        "",
        _load_snippet(out, artifact, cfg.model.name_or_path, summary),
        "",
        "## Files",
        "",
        f"- `{artifact}/`: the {'PEFT adapter' if artifact == 'adapter' else 'fine-tuned model'} with its tokenizer",
        "- `metrics.jsonl`: one line per logged step",
        *(
            ["- `checkpoints/`: resumable checkpoints (`phitune train CONFIG --resume`)"]
            if (out / "checkpoints").is_dir()
            else []
        ),
        "- `config.yaml`: the resolved configuration",
        "- `run.json`: the numbers above, machine-readable",
        "",
        "## Configuration",
        "",
        "```yaml",
        dump_config(cfg).rstrip(),
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def _load_snippet(out: Path, artifact: str, base: str, summary: dict) -> str:
    """The Python that loads the run's adapter (on its base) or model with transformers and PEFT."""
    cls = summary["model_class"]
    labels = f", num_labels={summary['num_labels']}" if summary["num_labels"] else ""
    if artifact == "adapter":
        return (
            f"```python\nfrom transformers import {cls}\nfrom peft import PeftModel\n"
            f"base = {cls}.from_pretrained({base!r}{labels})\n"
            f"model = PeftModel.from_pretrained(base, {str(out / artifact)!r})\n```"
        )
    return f"```python\nfrom transformers import {cls}\nmodel = {cls}.from_pretrained({str(out / artifact)!r})\n```"
