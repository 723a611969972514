"""`llava chat`: one-shot answers equal transformers' greedy generate; bad input is one line and exit 1."""

import struct
import subprocess
import sys
import zlib

import pytest
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava.cli import main
from llava.data.conversation import render
from llava.testing import build_tiny_checkpoint

QUESTION = "What is in the image?"


def _run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "llava", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, photos):
    path = tmp_path_factory.mktemp("images") / "cat.jpg"
    photos["wide"].save(path)
    return path


def test_one_shot_prints_only_transformers_greedy_answer(checkpoints, image_file):
    from PIL import Image

    folder = checkpoints("llava")
    result = _run("chat", "--model", str(folder), "--image", str(image_file), "--prompt", QUESTION,
                  "--conv-mode", "llava_v1", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    processor = AutoProcessor.from_pretrained(folder)
    hf = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    prompt, _ = render("llava_v1", [{"role": "user", "content": "<image>\n" + QUESTION}])
    inputs = processor(text=[prompt], images=[Image.open(image_file)], return_tensors="pt")
    out = hf.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    expected = expected.split("</s>")[0].strip()
    assert result.stdout == expected + "\n"


def test_interactive_multi_turn_from_stdin(checkpoints, image_file):
    result = _run("chat", "--model", str(checkpoints("llava_next")), "--image", str(image_file),
                  "--max-new-tokens", "4", stdin="What is this?\nAnd now?\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2


def _forged_png(path, width, height):
    """A PNG whose header claims width x height (a decompression bomb in waiting)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("case, message", [("missing", "no such file"), ("corrupt", "not a readable image"),
                                           ("bomb", "over the limit of 64000000 pixels"), ("folder", "not a file")])
def test_bad_images_are_one_line_errors(checkpoints, tmp_path, capsys, case, message):
    path = {"missing": tmp_path / "nope.png", "folder": tmp_path}.get(case)
    if case == "corrupt":
        path = tmp_path / "broken.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    if case == "bomb":
        path = _forged_png(tmp_path / "bomb.png", 30000, 30000)
    code = main(["chat", "--model", str(checkpoints("llava")), "--image", str(path), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("llava chat: error: ") and message in err and err.count("\n") == 1


def test_prompt_over_the_context_is_one_line_error(tmp_path, capsys, image_file):
    folder = build_tiny_checkpoint(tmp_path / "short", max_positions=64)
    capsys.readouterr()  # transformers' progress bar from writing the checkpoint
    code = main(["chat", "--model", str(folder), "--image", str(image_file), "--prompt", "why " * 80])
    err = capsys.readouterr().err
    assert code == 1 and "context length is 64" in err and err.count("\n") == 1


def test_missing_model_folder_is_one_line_error(tmp_path, capsys):
    code = main(["chat", "--model", str(tmp_path / "none"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 1 and "no such checkpoint folder" in err and "Traceback" not in err


def test_unknown_conv_mode_is_one_line_error(checkpoints, capsys):
    code = main(["chat", "--model", str(checkpoints("llava")), "--conv-mode", "nope", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 1 and "unknown conversation template 'nope'" in err and err.count("\n") == 1
