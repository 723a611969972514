"""The continuous-batching engine: the same answers as one-at-a-time generation whenever requests
join and leave, per-request settings, caches that change nothing but the work done, cancellation."""

import random
import threading

import pytest
import torch

import llava
from llava.generate.engine import Engine
from llava.generate.generate import generate_text
from llava.generate.sampling import SamplingParams
from llava.generate.stopping import TextStream

QUESTIONS = ["What is this?", "Describe the picture in detail, please.", "Is there a cat?", "Colour?"]


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def loaded(request, checkpoints):
    return llava.load_pretrained(checkpoints(request.param), device="cpu")


def _prompt(processor, question, image=True):
    content = f"{processor.image_token}\n{question}" if image else question
    return processor.build_prompt([{"role": "user", "content": content}], conv_mode="llava_v1")[0]


def _reference(model, processor, prompt, images, params):
    return generate_text(model, processor, [prompt], images or None, params)[0]


def test_requests_joining_a_running_batch_get_one_at_a_time_answers(loaded, photos):
    model, processor = loaded
    images = [photos["wide"], photos["square"], None, photos["tall"], photos["wide"], None]
    lengths = [30, 3, 17, 9, 1, 24]
    requests = [(_prompt(processor, QUESTIONS[i % 4], im is not None), [im] if im else [],
                 SamplingParams(max_new_tokens=n)) for i, (im, n) in enumerate(zip(images, lengths))]
    expected = [_reference(model, processor, *r) for r in requests]
    engine = Engine(model, processor, max_batch_size=3, prefix_cache_tokens=0)
    try:
        first = engine.submit(*requests[0])
        stream = iter(first)
        next(stream)  # the first request is decoding before the others arrive
        handles = [first] + [engine.submit(*r) for r in requests[1:]]
        results = [h.result(timeout=120) for h in handles]
    finally:
        engine.close()
    assert [r.text for r in results] == expected
    assert all(r.completion_tokens <= n for n, r in zip(lengths, results))
    assert all(r.finish_reason in ("stop", "length") for r in results)
    assert engine.stats.requests["length"] + engine.stats.requests["stop"] == len(requests)


def test_each_request_keeps_its_own_sampling_settings_and_stop_strings(loaded, photos):
    model, processor = loaded
    prompt = _prompt(processor, QUESTIONS[1])
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=7)
    greedy = SamplingParams(max_new_tokens=12)
    alone = Engine(model, processor)
    try:
        sampled_alone = alone.submit(prompt, [photos["wide"]], sampled).result().text
        greedy_text = alone.submit(prompt, [photos["wide"]], greedy).result().text
    finally:
        alone.close()
    assert sampled_alone == _reference(model, processor, prompt, [photos["wide"]], sampled)
    stop_at = greedy_text[len(greedy_text) // 2:][:3]
    stopped = SamplingParams(max_new_tokens=12, stop=[stop_at])
    engine = Engine(model, processor)
    try:
        handles = [engine.submit(prompt, [photos["wide"]], p) for p in (greedy, sampled, stopped, sampled)]
        results = [h.result() for h in handles]
    finally:
        engine.close()
    assert results[0].text == greedy_text
    assert results[1].text == results[3].text == sampled_alone  # a seed draws the same in any batch
    assert results[2].text == greedy_text[:greedy_text.index(stop_at)] and results[2].finish_reason == "stop"


def test_a_second_question_about_an_image_skips_the_vision_tower(loaded, photos):
    model, processor = loaded
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    engine = Engine(model, processor, prefix_cache_tokens=0)
    params = SamplingParams(max_new_tokens=5)
    try:
        first = engine.submit(_prompt(processor, QUESTIONS[0]), [photos["wide"]], params).result()
        copy = photos["wide"].copy()  # same pixels, another object: the key is the content
        second = engine.submit(_prompt(processor, QUESTIONS[2]), [copy], params).result()
        other = engine.submit(_prompt(processor, QUESTIONS[2]), [photos["tall"]], params).result()
    finally:
        engine.close()
        hook.remove()
    assert len(calls) == 2  # the wide photo once, the tall one once
    assert engine.stats.feature_cache_hits == 1 and engine.stats.feature_cache_misses == 2
    assert second.text == _reference(model, processor, _prompt(processor, QUESTIONS[2]), [photos["wide"]], params)
    assert other.text == _reference(model, processor, _prompt(processor, QUESTIONS[2]), [photos["tall"]], params)
    assert first.finish_reason in ("stop", "length")


def test_the_next_chat_turn_reuses_the_cached_prefix_with_the_same_answer(loaded, photos):
    model, processor = loaded
    params = SamplingParams(max_new_tokens=8)
    engine = Engine(model, processor, prefix_min_tokens=4)
    cold = Engine(model, processor, prefix_cache_tokens=0)
    try:
        messages = [{"role": "user", "content": f"{processor.image_token}\nWhat is this?"}]
        prompt = processor.build_prompt(messages, conv_mode="llava_v1")[0]
        answer = engine.submit(prompt, [photos["square"]], params).result()
        messages += [{"role": "assistant", "content": answer.text.strip()}, {"role": "user", "content": "Why?"}]
        prompt = processor.build_prompt(messages, conv_mode="llava_v1")[0]
        warm = engine.submit(prompt, [photos["square"]], params).result()
        fresh = cold.submit(prompt, [photos["square"]], params).result()
        # another image in the same place must not reuse the first image's keys
        other = engine.submit(prompt, [photos["tall"]], params).result()
    finally:
        engine.close()
        cold.close()
    assert warm.cached_tokens > answer.prompt_tokens // 2 and fresh.cached_tokens == 0
    assert warm.text == fresh.text
    image_start = prompt.index(processor.image_token)
    before_image = len(processor.tokenizer(prompt[:image_start])["input_ids"])
    assert other.cached_tokens <= before_image


def test_cancel_ends_one_request_and_the_engine_goes_on(loaded, photos):
    model, processor = loaded
    engine = Engine(model, processor)
    prompt = _prompt(processor, QUESTIONS[0])
    try:
        long = engine.submit(prompt, [photos["wide"]], SamplingParams(max_new_tokens=400))
        next(iter(long))
        long.cancel()
        cancelled = long.result(timeout=60)
        after = engine.submit(prompt, [photos["wide"]], SamplingParams(max_new_tokens=4)).result(timeout=60)
    finally:
        engine.close()
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 400
    assert after.text == _reference(model, processor, prompt, [photos["wide"]], SamplingParams(max_new_tokens=4))


def test_a_bad_request_fails_alone(loaded, photos):
    model, processor = loaded
    engine = Engine(model, processor)
    try:
        good = engine.submit(_prompt(processor, QUESTIONS[0]), [photos["wide"]], SamplingParams(max_new_tokens=6))
        broken = engine.prepare(_prompt(processor, QUESTIONS[0]), [photos["wide"]])
        broken.ids[-1] = 10 ** 6  # an id past the vocabulary
        bad = engine.submit(broken, params=SamplingParams(max_new_tokens=6))
        with pytest.raises(llava.core.errors.LlavaError, match="IndexError"):
            bad.result(timeout=60)
        assert good.result(timeout=60).finish_reason in ("stop", "length")
        assert engine.submit(_prompt(processor, "Again?", image=False), params=SamplingParams(max_new_tokens=3)
                             ).result(timeout=60).completion_tokens >= 1
    finally:
        engine.close()
    with pytest.raises(llava.core.errors.ContextLengthError):
        Engine(model, processor).submit("word " * (model.context_length + 5))


def test_many_threads_submitting_at_once(loaded, photos):
    model, processor = loaded
    choices = [(q, im) for q in QUESTIONS[:2] for im in ("wide", "tall", None)]
    params = SamplingParams(max_new_tokens=6)
    expected = {c: _reference(model, processor, _prompt(processor, c[0], c[1] is not None),
                              [photos[c[1]]] if c[1] else [], params) for c in choices}
    engine = Engine(model, processor, max_batch_size=8)
    results, rng = {}, random.Random(0)
    picks = [rng.choice(choices) for _ in range(24)]

    def client(i):
        q, im = picks[i]
        handle = engine.submit(_prompt(processor, q, im is not None), [photos[im]] if im else [], params)
        results[i] = "".join(handle)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(picks))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        engine.close()
    assert [results[i] for i in range(len(picks))] == [expected[p] for p in picks]


def test_incremental_detokenization_equals_decoding_the_whole(checkpoints):
    tokenizer = llava.load_pretrained(checkpoints("llava"), device="cpu")[1].tokenizer
    rng = random.Random(1)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        stream = TextStream(tokenizer)
        pieces = [stream.push(i) for i in ids] + [stream.finish()]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    # a multi-byte character split over byte tokens is released whole
    byte_level = torch.tensor(tokenizer("héllo wörld")["input_ids"]).tolist()
    stream = TextStream(tokenizer)
    assert "".join(stream.push(i) for i in byte_level) + stream.finish() == tokenizer.decode(
        byte_level, skip_special_tokens=True)


def test_the_loop_can_run_in_the_callers_thread(loaded, photos):
    model, processor = loaded
    engine = Engine(model, processor, threaded=False)
    prompt, params = _prompt(processor, QUESTIONS[0]), SamplingParams(max_new_tokens=5)
    out = {}

    def client():
        try:
            out["text"] = engine.submit(prompt, [photos["wide"]], params).result(timeout=60).text
        finally:
            engine.close()

    thread = threading.Thread(target=client)
    thread.start()
    engine.run_forever()  # returns once the client closes the engine
    thread.join()
    assert out["text"] == _reference(model, processor, prompt, [photos["wide"]], params)
