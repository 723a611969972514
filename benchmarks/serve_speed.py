"""Serving speed on one checkpoint (default: the bundled demo model), three figures, each with the
two numbers it compares and their ratio, all measured in this one run:

1. single-request decode: our Engine against transformers' LlavaForConditionalGeneration.generate
   (greedy, the same prompt and image, exactly --tokens new tokens each: EOS ignored);
2. throughput: --clients requests submitted at once against the same requests one at a time
   (total generated tokens per second);
3. a second question about an image already seen, time to a short answer: with no cache; with the
   image-feature cache alone (the vision tower skipped); with it and the prefix cache (the engine's
   default: the keys of the prompt up to the end of the image are reused too).

    .venv/bin/python benchmarks/serve_speed.py [--model models/demo] [--tokens 128] [--clients 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def best_of(repeats: int, run) -> float:
    """The fastest of several wall-clock timings (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def on_engine(make_engine, work):
    """work(engine) in a client thread while the engine loop runs in this (the main) thread, as under
    `llava serve` (see Engine.run_forever); returns what work returns."""
    engine, out = make_engine(), {}

    def client():
        try:
            out["result"] = work(engine)
        finally:
            engine.close()

    thread = threading.Thread(target=client)
    thread.start()
    engine.run_forever()
    thread.join()
    return out["result"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "demo"))
    parser.add_argument("--image", default=str(ROOT / "examples" / "images" / "shapes.png"))
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=1,
                        help="length of the second answer (default 1: a short VQA answer, the time to first token)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import llava
    from llava.data.images import load_image
    from llava.generate.chat import chat_prompt
    from llava.generate.engine import Engine
    from llava.generate.sampling import SamplingParams
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    model, processor = llava.load_pretrained(args.model, device="cpu", dtype="float32")
    image = load_image(args.image).convert("RGB")
    token = processor.image_token

    def prompt_for(question: str) -> str:
        return chat_prompt(processor, [{"role": "user", "content": f"{token}\n{question}"}])[0]

    fixed = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    prompt = prompt_for("Describe the image in detail.")
    figures = {}

    # 1. single-request decode
    hf_class = LlavaNextForConditionalGeneration if model.config.model_type == "llava_next" \
        else LlavaForConditionalGeneration
    hf = hf_class.from_pretrained(args.model, dtype=torch.float32).eval()
    hf_processor = AutoProcessor.from_pretrained(args.model)
    inputs = hf_processor(text=[prompt], images=[image], return_tensors="pt")
    # no EOS: transformers runs on past EOS exactly as our ignore_eos does, so both make the same tokens
    hf.generation_config.eos_token_id = None
    hf_kwargs = dict(max_new_tokens=args.tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    def plain_engine():
        return Engine(model, processor, prefix_cache_tokens=0, feature_cache_size=0, threaded=False)

    def timed(engine, run):
        start = time.perf_counter()
        result = run(engine)
        return time.perf_counter() - start, result

    with torch.no_grad():
        hf_out = hf.generate(**inputs, **hf_kwargs)  # warm-up, and the tokens to compare
    ours = on_engine(plain_engine, lambda e: e.submit(prompt, [image], fixed).result())
    hf_times, our_times = [], []
    for _ in range(args.repeats):  # interleaved, so a noisy moment on the machine hits both alike
        with torch.no_grad():
            hf_times.append(best_of(1, lambda: hf.generate(**inputs, **hf_kwargs)))
        our_times.append(on_engine(plain_engine, lambda e: timed(e, lambda e: e.submit(prompt, [image],
                                                                                        fixed).result()))[0])
    hf_time, ours_time = min(hf_times), min(our_times)
    same = processor.tokenizer.decode(hf_out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == \
        ours.text
    figures["single"] = {"ours_tok_s": args.tokens / ours_time, "transformers_tok_s": args.tokens / hf_time,
                         "ratio": hf_time / ours_time, "same_tokens": same}
    print(f"1. single request, {args.tokens} tokens: ours {args.tokens / ours_time:.1f} tok/s, "
          f"transformers generate {args.tokens / hf_time:.1f} tok/s, ratio {hf_time / ours_time:.2f}x "
          f"(same text: {same})")

    # 2. concurrent clients against one at a time
    questions = [f"Question {i}: what do you see?" for i in range(args.clients)]
    prompts = [prompt_for(q) for q in questions]
    images = [[image] for _ in prompts]
    def sequential_run(e):
        return [e.submit(p, im, fixed).result() for p, im in zip(prompts, images)]

    sequential = min(on_engine(plain_engine, lambda e: timed(e, sequential_run))[0] for _ in range(2))
    together = min(on_engine(plain_engine, lambda e: timed(e, lambda e: e.generate(prompts, images, fixed)))[0]
                   for _ in range(2))
    total = args.tokens * args.clients
    figures["concurrent"] = {"clients": args.clients, "together_tok_s": total / together,
                             "one_at_a_time_tok_s": total / sequential, "ratio": sequential / together}
    print(f"2. {args.clients} clients at once: {total / together:.1f} tok/s; one at a time: "
          f"{total / sequential:.1f} tok/s; ratio {sequential / together:.2f}x")

    # 3. a second question about the same image: no cache, the feature cache alone, and the feature
    # cache with the prefix cache (the engine's default: the image's keys are reused as well)
    short = SamplingParams(max_new_tokens=args.answer_tokens, ignore_eos=True)
    first, second = prompt_for("What shapes are there?"), prompt_for("What colour is the largest shape?")
    timings = {}
    for name, features, prefix in (("none", 0, 0), ("features", 64, 0), ("features+prefix", 64, 16384)):
        def rounds(engine):
            samples = []
            for round_ in range(max(7, args.repeats)):
                fresh = image.copy()
                fresh.putpixel((0, 0), (round_, 0, 0))  # a new image each round: the first question pays
                engine.submit(first, [fresh], short).result()
                samples.append(timed(engine, lambda e: e.submit(second, [fresh], short).result())[0])
            return statistics.median(samples)

        timings[name] = on_engine(lambda: Engine(model, processor, prefix_cache_tokens=prefix,
                                                 feature_cache_size=features, threaded=False), rounds)
    none = timings["none"]
    figures["second_question"] = {"answer_tokens": args.answer_tokens, **{f"{k}_s": v for k, v in timings.items()},
                                  "ratio_features": none / timings["features"],
                                  "ratio_features_prefix": none / timings["features+prefix"]}
    print(f"3. second question about the same image ({args.answer_tokens}-token answer): no cache "
          f"{none * 1000:.1f} ms; feature cache {timings['features'] * 1000:.1f} ms, ratio "
          f"{none / timings['features']:.2f}x; feature + prefix cache {timings['features+prefix'] * 1000:.1f} ms, "
          f"ratio {none / timings['features+prefix']:.2f}x")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
