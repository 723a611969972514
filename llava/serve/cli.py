"""`python -m llava.serve.cli --model-path PATH --image-file IMG`: the original LLaVA's terminal chat,
with its flags, forwarding to our ChatSession (CPU when there is no GPU)."""

from __future__ import annotations

import argparse
import sys

from ..core.errors import LlavaError


def main(args) -> int:
    from ..data.images import load_image
    from ..generate.chat import ChatSession
    from ..generate.sampling import SamplingParams
    from ..mm_utils import get_model_name_from_path
    from ..model.builder import conv_mode_for, load_pretrained_model

    model_name = get_model_name_from_path(args.model_path)
    tokenizer, model, _, _ = load_pretrained_model(args.model_path, args.model_base, model_name, args.load_8bit,
                                                   args.load_4bit, device=args.device)
    conv_mode = conv_mode_for(model_name)
    if args.conv_mode is not None and conv_mode != args.conv_mode:
        print(f"[WARNING] the auto inferred conversation mode is {conv_mode}, while `--conv-mode` is "
              f"{args.conv_mode}, using {args.conv_mode}", file=sys.stderr)
        conv_mode = args.conv_mode
    from ..conversation import conv_templates

    roles = conv_templates[conv_mode].roles
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    session = ChatSession(model, model.processor, conv_mode=conv_mode, params=params)
    image = load_image(args.image_file) if args.image_file else None
    while True:
        try:
            inp = input(f"{roles[0]}: ")
        except EOFError:
            inp = ""
        if not inp:
            print("exit...")
            return 0
        print(f"{roles[1]}: ", end="", flush=True)
        started = [False]

        def show(delta: str) -> None:
            if not started[0]:
                delta, started[0] = delta.lstrip(), bool(delta.strip())
            print(delta, end="", flush=True)

        session.ask(inp, image, on_text=show)
        image = None  # the image goes with the first turn
        print(flush=True)
        if args.debug:
            print("\n", {"prompt": session.messages, "outputs": session.messages[-1]["content"]}, "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.serve.cli")
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--image-file", type=str, required=True)
    parser.add_argument("--device", type=str, default="cuda", help="cuda (the CPU when there is no GPU) or cpu")
    parser.add_argument("--conv-mode", type=str, default=None)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--debug", action="store_true")
    return parser


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    try:
        sys.exit(main(arguments))
    except LlavaError as e:
        print(f"llava.serve.cli: error: {e}", file=sys.stderr)
        sys.exit(1)
