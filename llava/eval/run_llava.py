"""`python -m llava.eval.run_llava --model-path PATH --image-file IMG --query Q` and `eval_model(args)`:
the original LLaVA's one-shot answer, through the original names (tokenizer_image_token,
process_images, model.generate with the -200 image sentinel), all forwarding to ours."""

from __future__ import annotations

import argparse
import re
import sys

from ..core.errors import LlavaError


def image_parser(args) -> list[str]:
    return args.image_file.split(args.sep)


def load_images(image_files: list[str]) -> list:
    from ..data.images import load_image

    return [load_image(path).convert("RGB") for path in image_files]


def eval_model(args) -> str:
    """Print (and return) the answer; `args` has the original's fields (model_path, model_base, query,
    conv_mode, image_file, sep, temperature, top_p, num_beams, max_new_tokens)."""
    from ..constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_PLACEHOLDER
    from ..constants import IMAGE_TOKEN_INDEX
    from ..conversation import conv_templates
    from ..mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from ..model.builder import conv_mode_for, load_pretrained_model

    model_name = get_model_name_from_path(args.model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(args.model_path, getattr(args, "model_base", None),
                                                                 model_name)
    qs = args.query
    image_token_se = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    use_im_start_end = model.processor.image_wrap is not None
    if IMAGE_PLACEHOLDER in qs:
        qs = re.sub(IMAGE_PLACEHOLDER, image_token_se if use_im_start_end else DEFAULT_IMAGE_TOKEN, qs)
    else:
        qs = (image_token_se if use_im_start_end else DEFAULT_IMAGE_TOKEN) + "\n" + qs
    conv_mode = conv_mode_for(model_name)
    if getattr(args, "conv_mode", None) is not None and conv_mode != args.conv_mode:
        print(f"[WARNING] the auto inferred conversation mode is {conv_mode}, while `--conv-mode` is "
              f"{args.conv_mode}, using {args.conv_mode}", file=sys.stderr)
        conv_mode = args.conv_mode
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], qs)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    images = load_images(image_parser(args))
    images_tensor = process_images(images, image_processor, model.config)
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    temperature = getattr(args, "temperature", 0.2)
    output_ids = model.generate(input_ids, images=images_tensor, image_sizes=[x.size for x in images],
                                do_sample=temperature > 0, temperature=temperature, top_p=getattr(args, "top_p", None),
                                num_beams=getattr(args, "num_beams", 1), max_new_tokens=getattr(args, "max_new_tokens",
                                                                                                 512), use_cache=True)
    outputs = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
    print(outputs)
    return outputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.run_llava")
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--image-file", type=str, required=True)
    parser.add_argument("--query", type=str, required=True)
    parser.add_argument("--conv-mode", type=str, default=None)
    parser.add_argument("--sep", type=str, default=",")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    return parser


if __name__ == "__main__":
    try:
        eval_model(build_parser().parse_args())
    except LlavaError as e:
        print(f"llava.eval.run_llava: error: {e}", file=sys.stderr)
        sys.exit(1)
