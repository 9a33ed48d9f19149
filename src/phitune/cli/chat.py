"""`phitune generate` and `phitune chat`: a model answers, on PyTorch or ONNX Runtime."""

from __future__ import annotations

import argparse
import sys

from phitune.argtypes import non_negative_float, positive_int
from phitune.registry import BACKENDS


def cmd_generate(args: argparse.Namespace) -> int:
    from phitune.backends import complete, open_backend
    from phitune.sources import check_source

    check_source(args.model, "model")  # before torch is imported: a typo is answered at once
    backend = open_backend(args.model, backend=args.backend, adapter=args.adapter)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    print(complete(backend, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Read a message per line from stdin (a typed \\n is a line break), stream the reply; /reset
    forgets the conversation, /exit or end of input ends."""
    from phitune.backends import open_backend
    from phitune.sources import check_source

    check_source(args.model, "model")  # before torch is imported: a typo is answered at once
    backend = open_backend(args.model, backend=args.backend, adapter=args.adapter)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    if interactive:
        print(f"phitune chat ({backend.name}): type a message; /reset clears the conversation, /exit quits")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        text = line.strip().replace("\\n", "\n")  # a typed \n is a line break inside the message
        if not text:
            continue
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        print("assistant> " if interactive else "", end="", flush=True)
        reply = ""
        for piece in backend.stream(system + history, max_new_tokens=args.max_new_tokens, temperature=args.temperature):
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": reply.strip()})


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="print a chat completion from a model (with or without an adapter)")
    g.add_argument("model", help="base model dir/hub id, training output dir, adapter dir or merged model")
    g.add_argument("--adapter", help="torch: a PEFT adapter dir to apply; onnx: an adapter NAME of a multi-LoRA export")
    g.add_argument("--prompt", required=True, help="the user message")
    g.add_argument("--system", help="optional system message")
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--backend", choices=BACKENDS, help="default: onnx for an exported model, else torch")
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive chat in the terminal, streaming (torch or ONNX Runtime)")
    ch.add_argument("model", help="base model, training output, adapter dir, merged model, or an ONNX export")
    ch.add_argument(
        "--adapter", help="torch: a PEFT adapter dir to apply; onnx: an adapter NAME of a multi-LoRA export"
    )
    ch.add_argument("--backend", choices=BACKENDS, help="default: onnx for an exported model, else torch")
    ch.add_argument("--system", help="system message")
    ch.add_argument("--max-new-tokens", type=positive_int, default=256)
    ch.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    ch.set_defaults(func=cmd_chat)
