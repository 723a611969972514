"""The `llava` command: one sub-command per stage; each parses its flags and calls the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.errors import LlavaError

# The bundled demo checkpoint, used when --model is not given.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint folder or hub id (default: the bundled demo model in models/demo)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default)")


def _load(args):
    from .model.checkpoint import load_pretrained

    model = args.model
    if model is None:
        if not (DEFAULT_MODEL / "config.json").exists():
            raise LlavaError(f"no --model given and no bundled demo model at {DEFAULT_MODEL}")
        model = DEFAULT_MODEL
    return load_pretrained(model, device=args.device, dtype=args.dtype, conv_mode=args.conv_mode)


def cmd_chat(args) -> int:
    from .data.conversation import CHAT_TEMPLATE, get_template
    from .data.images import load_image
    from .generate.chat import ChatSession
    from .generate.sampling import SamplingParams

    if args.conv_mode not in (None, CHAT_TEMPLATE):
        get_template(args.conv_mode)  # an unknown name fails before the model is loaded
    image = load_image(args.image) if args.image else None  # likewise a bad image
    model, processor = _load(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    session = ChatSession(model, processor, params=params)
    if args.prompt is not None:
        answer = session.ask(args.prompt, image)
        print(answer)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        try:
            text = input("USER: " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        if not text.strip():
            continue
        if interactive:
            print("ASSISTANT: ", end="", flush=True)
        first_delta = [True]

        def show(delta: str) -> None:
            if first_delta[0]:
                delta, first_delta[0] = delta.lstrip(), False
            print(delta, end="", flush=True)

        session.ask(text, image, on_text=show)
        image = None  # the image goes with the first turn only
        print(flush=True)


def cmd_train(args) -> int:
    from .train.config import load_config, overrides_from_args
    from .train.loop import train

    result = train(load_config(args.config, overrides_from_args(args)))
    if _is_main_process():
        last = result.metrics[-1] if result.metrics else {}
        print(f"llava train: {result.state.step} steps, final loss {last.get('loss', float('nan')):.4f}; "
              f"model in {result.output}", file=sys.stderr)
    return 0


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava", description="LLaVA: chat with images, on CPU or GPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat about an image in the terminal (one-shot with --prompt)")
    _add_model_args(chat)
    chat.add_argument("--image", default=None, help="image file to talk about")
    chat.add_argument("--prompt", default=None, help="ask once and print only the answer")
    chat.add_argument("--conv-mode", default=None,
                      help="conversation template (default: the checkpoint's), e.g. llava_v1, chat_template")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--repetition-penalty", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.set_defaults(func=cmd_chat)

    from .train.config import add_arguments

    train = sub.add_parser("train", help="train a LLaVA (stage 1 pretrain, stage 2 finetune, LoRA/QLoRA)",
                           description="Train from a YAML recipe; every setting can be overridden by its flag. "
                                       "Runs on several processes under torchrun / accelerate launch.")
    train.add_argument("--config", default=None, help="YAML recipe (see recipes/)")
    add_arguments(train)
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LlavaError as e:
        print(f"llava {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
