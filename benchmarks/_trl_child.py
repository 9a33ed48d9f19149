"""The baseline: TRL's SFTTrainer + a PEFT LoraConfig, as a user would write it. Run by
train_throughput.py in its own process; prints one JSON line with what it measured."""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _memory import peak_rss_mb  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.0, help="LoraConfig.lora_dropout (PEFT's default: 0)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (TrainingArguments.bf16)")
    p.add_argument("--padding-free", action="store_true", help="SFTConfig.padding_free: rows flattened, no padding")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    # Prompt/completion conversational format: TRL then trains on the completion only, like phitune.
    raw = load_dataset("json", data_files=args.data, split="train")
    ds = raw.map(
        lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}, remove_columns=["messages"]
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = SFTConfig(
        output_dir=args.output,
        per_device_train_batch_size=args.batch_size,
        # Padding-free without packing does not truncate (TRL refuses a max_length): the rows here fit.
        max_length=None if args.padding_free and not args.packing else args.max_length,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=args.bf16,
        packing=args.packing,
        padding_free=args.padding_free,
        lr_scheduler_type="linear",
        seed=args.seed,
        **({"gradient_checkpointing": False} if args.no_gradient_checkpointing else {}),
    )
    peft_config = LoraConfig(
        r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=ds, processing_class=tokenizer, peft_config=peft_config
    )
    # Real tokens: what the collator feeds the model, without padding (one epoch sees each once).
    real_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    train_start = time.time()
    started = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainer.model.save_pretrained(args.output + "/adapter")
    print(
        json.dumps(
            {
                "steps": trainer.state.global_step,
                "real_tokens": real_tokens,
                "train_seconds": seconds,
                "train_start": train_start,
                "train_runtime": out.metrics.get("train_runtime"),
                "losses": losses,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


if __name__ == "__main__":
    main()
