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
    parser.add_argument("--model-base", default=None,
                        help="base language model of an original projector-only or LoRA checkpoint")
    parser.add_argument("--vision-tower", default=None, help="replace an original checkpoint's mm_vision_tower")
    bits = parser.add_mutually_exclusive_group()
    bits.add_argument("--load-8bit", action="store_true", help="language model in 8 bits (bitsandbytes)")
    bits.add_argument("--load-4bit", action="store_true", help="language model in 4 bits NF4 (bitsandbytes)")


def _load(args):
    from .model.checkpoint import load_pretrained

    model = args.model
    if model is None:
        if not (DEFAULT_MODEL / "config.json").exists():
            raise LlavaError(f"no --model given and no bundled demo model at {DEFAULT_MODEL}")
        model = DEFAULT_MODEL
    model, processor = load_pretrained(model, device=args.device, dtype=args.dtype, conv_mode=args.conv_mode,
                                       model_base=getattr(args, "model_base", None),
                                       vision_tower=getattr(args, "vision_tower", None),
                                       load_8bit=getattr(args, "load_8bit", False),
                                       load_4bit=getattr(args, "load_4bit", False))
    if model.quantization is not None:
        print(f"llava: {model.quantization.saved}", file=sys.stderr)
    return model, processor


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


def cmd_synth(args) -> int:
    from .data.shapes import synth

    splits = {"train": args.train, "val": args.val, "test": args.test}
    if args.single:
        splits["single"] = args.single
    counts = synth(args.output, splits, seed=args.seed, side=args.image_size, progress=True)
    print(f"llava synth: {', '.join(f'{n} {s}' for s, n in counts.items())} images in {args.output}",
          file=sys.stderr)
    return 0


def cmd_datagen(args) -> int:
    from .datagen.context import load_coco
    from .datagen.prompts import KINDS
    from .datagen.runner import finish, run
    from .datagen.teachers import OpenAITeacher, RuleTeacher

    kinds = tuple(args.kinds.split(",")) if args.kinds else KINDS
    contexts = load_coco(args.captions, args.instances)
    if args.limit:
        contexts = contexts[:args.limit]
    if args.teacher == "rules":
        teacher = RuleTeacher(seed=args.seed)
    else:
        teacher = OpenAITeacher(base_url=args.base_url, model=args.model, api_key=args.api_key,
                                temperature=args.temperature, max_tokens=args.max_tokens, timeout=args.timeout,
                                max_retries=args.max_retries)
    summary = run(contexts, teacher, args.output, kinds=kinds, concurrency=args.concurrency, attempts=args.attempts,
                  seed=args.seed, progress=True, log=lambda m: print(m, file=sys.stderr))
    target = finish(args.output, kinds, seed=args.seed)
    rejected = sum(summary.rejected.values())
    print(f"llava datagen: {sum(summary.written.values())} records written, {sum(summary.skipped.values())} "
          f"already done, {rejected} rejected"
          + (f" ({', '.join(f'{k}: {v}' for k, v in summary.rejected.most_common())}; see rejects.jsonl)"
             if rejected else "") + f"; {target}", file=sys.stderr)
    if summary.failed:
        for error in summary.errors:
            print(f"llava datagen: {error}", file=sys.stderr)
        print(f"llava datagen: error: {summary.failed} contexts not done (teacher unavailable); run the same "
              "command again to continue", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    from .demo import rebuild, run_demo, summary_table

    result = run_demo(args.work, args.recipe, fresh=args.fresh, log=lambda m: print(m, file=sys.stderr))
    print(summary_table(result))
    if args.rebuild:
        target = rebuild(result)
        print(f"llava demo: the bundled model in {target} is rebuilt", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    import json

    from .eval.shapes import evaluate_shapes

    if args.action != "summary" and (not args.benchmark or not args.data):
        raise LlavaError(f"llava eval {args.action} needs --benchmark and --data")
    if args.action == "summary":
        from .eval.summary import collect, write_summary

        roots = args.runs or ["runs/eval"]
        table = collect(roots)
        files = write_summary(table, args.output or roots[0])
        print(json.dumps(table) if args.json else files["md"].read_text(), end="" if not args.json else "\n")
        return 0
    if args.action == "score":
        from .eval.score import score

        if not args.predictions:
            raise LlavaError("llava eval score needs --predictions FILE")
        metrics = score(args.benchmark, args.predictions, args.data, args.output, judge=_judge(args))
        print(json.dumps(metrics) if args.json else json.dumps(metrics, indent=2))
        return 0
    if args.benchmark != "shapes":
        return _eval_benchmark(args)
    args.conv_mode = None
    model, processor = _load(args)
    metrics = evaluate_shapes(model, processor, args.data, split=args.split, limit=args.limit,
                              batch_size=args.batch_size, output=args.output, progress=not args.json)
    if args.json:
        print(json.dumps(metrics))
    else:
        short = metrics["short"]
        print(f"shapes {args.split}: short-answer accuracy {short['accuracy']:.1%} (n={short['n']}; "
              + ", ".join(f"{k} {v:.1%}" for k, v in short.items() if k not in ("accuracy", "n")) + ")")
        for name, m in metrics["pope"].items():
            print(f"POPE {name}: accuracy {m['accuracy']:.1%}, precision {m['precision']:.3f}, recall "
                  f"{m['recall']:.3f}, F1 {m['f1']:.3f}, yes-ratio {m['yes_ratio']:.1%} (n={m['n']})")
    return 0


def _judge(args):
    """The GPT judge (any OpenAI-compatible endpoint) when --judge-model or $LLAVA_JUDGE_MODEL names one."""
    import os

    model = args.judge_model or os.environ.get("LLAVA_JUDGE_MODEL")
    if not model:
        return None
    from .datagen.teachers import OpenAITeacher

    return OpenAITeacher(base_url=args.judge_base_url, model=model, api_key=args.judge_api_key, temperature=0.2,
                         max_tokens=1024, max_retries=args.judge_retries)


def _eval_benchmark(args) -> int:
    """A published benchmark: answer (resumably, optionally one chunk of N), then score."""
    import json
    import os

    from .core.io import atomic_write_text
    from .eval.run import merge_chunks, run_benchmark
    from .eval.score import score

    output = Path(args.output or f"runs/eval/{Path(args.model or 'demo').name}/{args.benchmark}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.num_chunks == 1 and world > 1:  # under torchrun / accelerate launch: one chunk per process
        args.num_chunks, args.chunk_idx = world, int(os.environ.get("RANK", "0"))
    if args.action == "merge":
        answers = merge_chunks(output, args.num_chunks)
    else:
        args.conv_mode = None
        model, processor = _load(args)
        answers = run_benchmark(model, processor, args.benchmark, args.data, output, image_folder=args.image_folder,
                                limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                num_chunks=args.num_chunks, chunk_idx=args.chunk_idx, progress=not args.json,
                                model_id=Path(args.model or "demo").name)
        if args.num_chunks > 1:
            print(f"llava eval: chunk {args.chunk_idx} of {args.num_chunks} in {answers}; when all are done: "
                  f"llava eval merge --benchmark {args.benchmark} --num-chunks {args.num_chunks} --output {output} "
                  f"--data {args.data}", file=sys.stderr)
            return 0
    try:
        metrics = score(args.benchmark, answers, args.data, output, judge=_judge(args))
    except LlavaError as e:
        raise LlavaError(f"answers are in {answers}, but they cannot be scored: {e}") from None
    atomic_write_text(output / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics) if args.json else f"{args.benchmark}: {json.dumps(metrics)}")
    return 0


def _clip_encoder(args):
    from .clip.encoder import ClipEncoder

    model = args.model or DEFAULT_MODEL / "clip"
    if args.model is None and not (DEFAULT_MODEL / "clip" / "config.json").exists():
        raise LlavaError(f"no --model given and no bundled CLIP model at {model}")
    return ClipEncoder.load(model, device="cpu" if args.device == "auto" else args.device)


def cmd_clip_classify(args) -> int:
    from .clip.classify import classify
    from .data.images import load_image

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    image = load_image(args.image)
    probs = classify(_clip_encoder(args), [image], labels, args.prompt)[0]
    for label, p in sorted(zip(labels, probs), key=lambda x: -x[1]):
        print(f"{p:.4f}\t{label}")
    return 0


def cmd_clip_index(args) -> int:
    from .clip.search import index_folder

    count = index_folder(_clip_encoder(args), args.folder, args.index, progress=True)
    print(f"llava clip index: {count} images indexed in {args.index}", file=sys.stderr)
    return 0


def cmd_clip_search(args) -> int:
    from .clip.search import search

    for hit in search(_clip_encoder(args), args.index, text=args.text, image=args.image, top_k=args.top_k):
        print(f"{hit.score:.4f}\t{hit.path}")
    return 0


def _engine(args, threaded: bool = True):
    from .generate.engine import Engine

    model, processor = _load(args)
    return Engine(model, processor, max_batch_size=args.max_batch_size, feature_cache_size=args.feature_cache_size,
                  prefix_cache_tokens=args.prefix_cache_tokens, threaded=threaded)


def cmd_serve(args) -> int:
    import os
    import signal
    import threading

    import uvicorn

    from .serve.api import ServeConfig, create_app
    from .serve.media import MediaPolicy

    media = MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                        allow_remote_images=args.allow_remote_images, max_image_bytes=args.max_image_bytes,
                        max_image_pixels=args.max_image_pixels, fetch_timeout=args.fetch_timeout)
    engine = _engine(args, threaded=False)  # its loop runs in the main thread below
    name = args.served_model_name or (args.model or "llava-demo")
    config = ServeConfig(model_name=name, api_key=args.api_key or os.environ.get("LLAVA_API_KEY"),
                         conv_mode=args.conv_mode, media=media, max_body_bytes=args.max_body_bytes,
                         max_images_per_request=args.max_images_per_request, max_queue=args.max_queue)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), host=args.host, port=args.port,
                                           log_level=args.log_level, timeout_graceful_shutdown=5))
    # HTTP in a thread, the model in the main thread (see Engine.run_forever); Ctrl-C or SIGTERM stops both
    thread = threading.Thread(target=_serve_until_done, args=(server, engine), name="http", daemon=True)
    thread.start()
    signal.signal(signal.SIGTERM, lambda *_: engine.close())
    print(f"llava serve: {name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        engine.run_forever()
    except KeyboardInterrupt:
        engine.close()
    server.should_exit = True
    thread.join(timeout=10)
    if getattr(server, "startup_failed", False) or not server.started:
        raise LlavaError(f"could not serve on {args.host}:{args.port} (is the port in use?)")
    return 0


def _serve_until_done(server, engine) -> None:
    try:
        server.run()
    finally:
        engine.close()  # the server stopped (or could not start): end the engine's loop too


def cmd_webui(args) -> int:
    from .serve.webui import ApiBackend, EngineBackend, build_ui

    engine = None
    if args.api_url:
        backend = ApiBackend(args.api_url, api_key=args.api_key, model=args.served_model_name)
    else:
        engine = _engine(args, threaded=False)  # its loop runs in the main thread below
        backend = EngineBackend(engine, conv_mode=args.conv_mode)
    page = build_ui(backend).queue(default_concurrency_limit=args.concurrency)
    page.launch(server_name=args.host, server_port=args.port, share=False, show_error=True,
                prevent_thread_lock=engine is not None)
    if engine is not None:  # the model in the main thread (see Engine.run_forever)
        try:
            engine.run_forever()
        except KeyboardInterrupt:
            pass
        finally:
            page.close()
    return 0


def cmd_convert(args) -> int:
    from .model.checkpoint import load_pretrained, save_pretrained
    from .model.original import detect_form

    source = Path(args.source)
    if (source / "adapter_config.json").exists() and detect_form(source) is None:
        # our own LoRA adapter (llava train with lora): merged into the llava-hf model it was trained from
        if not args.merge_lora or not args.model_base:
            raise LlavaError(f"{source} is a LoRA adapter: pass --merge-lora and --model-base (the model it was "
                             "trained from)")
        from .train.lora import merge_adapter

        base, processor = load_pretrained(args.model_base, device="cpu", dtype="float32", conv_mode=args.conv_mode)
        model = merge_adapter(base, source)
    else:
        if detect_form(source) == "lora" and not args.merge_lora:
            raise LlavaError(f"{source} is a LoRA adapter: pass --merge-lora (with --model-base)")
        model, processor = load_pretrained(source, device="cpu", dtype="float32", conv_mode=args.conv_mode,
                                           model_base=args.model_base, vision_tower=args.vision_tower)
    if args.format == "gguf":
        from .model.export_gguf import export_gguf

        text, mmproj = export_gguf(model, processor, args.output, outtype="f32" if args.dtype == "float32" else "f16",
                                   name=Path(args.source).name)
        print(f"llava convert: wrote {text} and {mmproj} (for llama.cpp: llama-mtmd-cli -m {text.name} "
              f"--mmproj {mmproj.name})", file=sys.stderr)
        return 0
    if args.dtype != "float32":
        from .core.device import resolve_dtype

        dtype = resolve_dtype(args.dtype, model.device)
        model = model.to(dtype)
        model.config.text_config.dtype = model.config.vision_config.dtype = dtype  # recorded as transformers does
    out = save_pretrained(model, processor, args.output, max_shard_size=args.max_shard_size)
    print(f"llava convert: wrote {out} ({model.config.model_type}, template {processor.conv_mode}, "
          f"{args.dtype})", file=sys.stderr)
    return 0


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together (default 32)")
    parser.add_argument("--feature-cache-size", type=int, default=64, help="images whose features are kept")
    parser.add_argument("--prefix-cache-tokens", type=int, default=16384,
                        help="tokens of finished conversations kept for reuse (0 = off)")


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

    synth = sub.add_parser("synth", help="write the shapes world: images, COCO captions and boxes, questions")
    synth.add_argument("--output", required=True, help="folder to write (e.g. data/shapes)")
    synth.add_argument("--train", type=int, default=4000, help="train images (default 4000)")
    synth.add_argument("--val", type=int, default=100)
    synth.add_argument("--test", type=int, default=500)
    synth.add_argument("--single", type=int, default=0,
                       help="extra one-object training scenes, the mini CLIP's curriculum (default 0)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=96, help="image side in pixels (default 96)")
    synth.set_defaults(func=cmd_synth)

    datagen = sub.add_parser("datagen", help="write LLaVA instruction data from captions + boxes with a teacher",
                             description="Conversation, detailed description and complex reasoning records from "
                                         "COCO-style captions (and instances). Resumable: rerun to continue.")
    datagen.add_argument("--captions", required=True, help="COCO captions file (captions_*.json)")
    datagen.add_argument("--instances", default=None, help="COCO instances file with the boxes (instances_*.json)")
    datagen.add_argument("--output", required=True, help="folder for <kind>.jsonl, rejects.jsonl, llava_instruct.json")
    datagen.add_argument("--teacher", choices=("openai", "rules"), default="openai",
                         help="openai: any OpenAI-compatible endpoint; rules: offline, shapes world only")
    datagen.add_argument("--base-url", default=None, help="endpoint, e.g. http://localhost:8000/v1 "
                                                         "(default: $OPENAI_BASE_URL or OpenAI)")
    datagen.add_argument("--model", default=None, help="teacher model name (default: $LLAVA_TEACHER_MODEL)")
    datagen.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY")
    datagen.add_argument("--kinds", default=None, help="comma-separated: conversation,detail,complex_reasoning")
    datagen.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    datagen.add_argument("--attempts", type=int, default=2, help="asks per context before a reply is rejected")
    datagen.add_argument("--max-retries", type=int, default=5, help="retries of a failed request (backoff)")
    datagen.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    datagen.add_argument("--temperature", type=float, default=0.7)
    datagen.add_argument("--max-tokens", type=int, default=1024)
    datagen.add_argument("--limit", type=int, default=None, help="only the first N images")
    datagen.add_argument("--seed", type=int, default=0)
    datagen.set_defaults(func=cmd_datagen)

    demo = sub.add_parser("demo", help="the whole recipe in miniature on CPU: synth, CLIP, LM, datagen, "
                                       "stage 1, stage 2, eval")
    demo.add_argument("--work", default="runs/demo", help="work folder (default runs/demo); steps done are kept")
    demo.add_argument("--recipe", default=str(Path(__file__).resolve().parent.parent / "recipes" / "mini.yaml"))
    demo.add_argument("--fresh", action="store_true", help="start over: delete the work folder first")
    demo.add_argument("--rebuild", action="store_true", help="copy the result into models/demo (the bundled model)")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /metrics)",
                           description="Safe by default: local files and remote URLs are refused unless allowed.")
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $LLAVA_API_KEY)")
    serve.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                       help="allow file:// and path image URLs under DIR (default: none)")
    serve.add_argument("--allow-remote-images", action="store_true", help="allow fetching http(s) image URLs")
    serve.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    serve.add_argument("--max-image-pixels", type=int, default=64_000_000)
    serve.add_argument("--max-images-per-request", type=int, default=8)
    serve.add_argument("--max-body-bytes", type=int, default=50 * 1024 * 1024)
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    serve.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds for one remote image")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    webui = sub.add_parser("webui", help="Gradio chat page on the engine, or on a running `llava serve`")
    _add_engine_args(webui)
    webui.add_argument("--api-url", default=None, help="talk to a running server, e.g. http://127.0.0.1:8000/v1")
    webui.add_argument("--api-key", default=None, help="the server's key (default: $LLAVA_API_KEY)")
    webui.add_argument("--served-model-name", default=None, help="model id on that server (default: its first)")
    webui.add_argument("--host", default="127.0.0.1")
    webui.add_argument("--port", type=int, default=7860)
    webui.add_argument("--concurrency", type=int, default=16, help="chats generating at once (default 16)")
    webui.set_defaults(func=cmd_webui)

    convert = sub.add_parser("convert", help="write a llava-hf checkpoint from an original LLaVA one (full, "
                                             "projector-only or LoRA) or merge a LoRA adapter",
                             description="The form is read from the files: config.json with mm_vision_tower, "
                                         "mm_projector.bin, adapter_config.json + non_lora_trainables.")
    convert.add_argument("source", help="checkpoint folder (or hub id)")
    convert.add_argument("output", help="folder for the llava-hf checkpoint (written atomically)")
    convert.add_argument("--model-base", default=None, help="the language model (projector-only, LoRA) or, for "
                                                           "our own adapters, the llava-hf model trained from")
    convert.add_argument("--vision-tower", default=None, help="use this folder instead of config.json's "
                                                             "mm_vision_tower (offline)")
    convert.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into its base")
    convert.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                         help="weights' type (gguf: float16 -> f16, float32 -> f32)")
    convert.add_argument("--format", default="llava-hf", choices=("llava-hf", "gguf"),
                         help="gguf: llava-model.gguf + mmproj-model.gguf for llama.cpp / Ollama")
    convert.add_argument("--max-shard-size", default="5GB", help="split the weights into files of this size")
    convert.add_argument("--conv-mode", default=None, help="template to record (default: inferred)")
    convert.set_defaults(func=cmd_convert)

    evaluate = sub.add_parser("eval", help="evaluate a model on a benchmark, or score a predictions file",
                              description="llava eval --benchmark shapes --data DIR: answer and score. "
                                          "llava eval score --benchmark NAME --predictions FILE --data DIR: score "
                                          "LLaVA answers JSONL against the benchmark's own files (vqav2, textvqa, "
                                          "vizwiz, gqa, scienceqa, pope, mme, mmbench, seed).")
    evaluate.add_argument("action", nargs="?", choices=("run", "score", "merge", "summary"), default="run",
                          help="run (default): answer and score; score: score --predictions; merge: join chunks; "
                               "summary: table + chart of runs/eval/MODEL/BENCHMARK/metrics.json")
    _add_model_args(evaluate)
    evaluate.add_argument("--benchmark", default=None, help="shapes, vqav2, textvqa, vizwiz, gqa, scienceqa, pope, "
                                                           "mme, mmbench, seed, llava_bench, mmvet")
    evaluate.add_argument("--runs", nargs="*", default=None, help="summary: folders of MODEL/BENCHMARK/metrics.json "
                                                                  "(default runs/eval)")
    evaluate.add_argument("--predictions", default=None, help="answers JSONL to score (llava eval score)")
    evaluate.add_argument("--image-folder", default=None, help="where the question files' images are "
                                                               "(default: DATA/images)")
    evaluate.add_argument("--max-new-tokens", type=int, default=128)
    evaluate.add_argument("--judge-model", default=None, help="judge for llava_bench / mmvet (default: "
                                                             "$LLAVA_JUDGE_MODEL)")
    evaluate.add_argument("--judge-base-url", default=None, help="judge endpoint (default: $OPENAI_BASE_URL)")
    evaluate.add_argument("--judge-api-key", default=None, help="default: $OPENAI_API_KEY")
    evaluate.add_argument("--judge-retries", type=int, default=5, help="retries of a failed judge request")
    evaluate.add_argument("--num-chunks", type=int, default=1, help="split the questions over N processes")
    evaluate.add_argument("--chunk-idx", type=int, default=0, help="which chunk this process answers")
    evaluate.add_argument("--data", default=None, help="benchmark data folder (shapes: the `llava synth` output)")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--limit", type=int, default=None, help="first N questions of each file")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--output", default=None, help="folder for predictions and metrics.json")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.set_defaults(func=cmd_eval)

    clip = sub.add_parser("clip", help="CLIP zero-shot classification and image retrieval")
    clip_sub = clip.add_subparsers(dest="clip_command", required=True)
    for name, help_text, func in (("classify", "zero-shot: image + candidate labels -> probabilities",
                                   cmd_clip_classify),
                                  ("index", "embed every image of a folder into an index on disk", cmd_clip_index),
                                  ("search", "rank indexed images against a text or an image", cmd_clip_search)):
        p = clip_sub.add_parser(name, help=help_text)
        p.add_argument("--model", default=None, help="CLIPModel folder or hub id (default: the bundled tiny CLIP)")
        p.add_argument("--device", default="auto")
        p.set_defaults(func=func)
        if name == "classify":
            p.add_argument("--image", required=True)
            p.add_argument("--labels", required=True, help="comma-separated candidate labels")
            p.add_argument("--prompt", default="a photo of a {label}", help="default: 'a photo of a {label}'")
        elif name == "index":
            p.add_argument("--folder", required=True, help="images to index (searched recursively)")
            p.add_argument("--index", required=True, help="folder to write the index to")
        else:
            p.add_argument("--index", required=True)
            p.add_argument("--text", default=None, help="text query")
            p.add_argument("--image", default=None, help="query image")
            p.add_argument("--top-k", type=int, default=5)
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
