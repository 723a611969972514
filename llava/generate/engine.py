"""Continuous-batching generation engine: requests join and leave one running batch between decode
steps, each with its own sampling settings, stop strings, text stream and cancellation.

Two caches keep repeated work away:
- image features, keyed by the image's pixels: a second question about the same image does not
  run the vision tower again;
- the KV cache of finished requests (prompt + answer), reused for the longest common prefix of a
  new prompt, so the next turn of a chat, or a new question about an image just discussed, only
  prefills what is new. Image positions are keyed by image content, so two different images
  never share a prefix.

The batch keeps every row's keys right-aligned: a row that joins with a shorter history is padded
on the left (masked out), and columns nobody needs are dropped when rows leave. One thread owns
the model; `submit` may be called from any thread, and a handle can be read from a thread
(`for delta in handle`) or from asyncio (`async for delta in handle`).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..core.errors import ContextLengthError, LlavaError
from .generate import _eos_ids
from .sampling import SamplingParams, next_tokens
from .stopping import TextStream


@dataclass
class Completion:
    """The end of one request."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache
    error: str | None = None
    time_to_first_token: float | None = None
    latency: float = 0.0


@dataclass
class EngineStats:
    """Counters since start, and the current load; the server exports them as Prometheus metrics."""

    requests: dict = field(default_factory=lambda: {"stop": 0, "length": 0, "cancelled": 0, "error": 0})
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    feature_cache_hits: int = 0
    feature_cache_misses: int = 0
    decode_steps: int = 0
    running: int = 0
    waiting: int = 0


_DONE = object()


class RequestHandle:
    """One submitted request: iterate it for text deltas, `result()` for the Completion, `cancel()` to stop."""

    def __init__(self, request_id: int, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.created = time.perf_counter()
        self.completion: Completion | None = None
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()

    # -- called by the engine thread ------------------------------------------------------------------
    def _emit(self, item) -> None:
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone: nobody is listening any more
            self._cancelled.set()

    def _finish(self, completion: Completion) -> None:
        self.completion = completion
        completion.latency = time.perf_counter() - self.created
        self._done.set()
        self._emit(_DONE)

    # -- called by the client -------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generating; the handle finishes with finish_reason "cancelled" at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self):
        if self._loop is not None:
            raise LlavaError("this request was submitted with an event loop: use `async for`")
        while (item := self._queue.get()) is not _DONE:
            yield item
        self._raise_if_failed()

    async def __aiter__(self):
        if self._loop is None:
            raise LlavaError("this request was submitted without an event loop: use `for`")
        while (item := await self._queue.get()) is not _DONE:
            yield item
        self._raise_if_failed()

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end; raises LlavaError if the request failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        self._raise_if_failed()
        return self.completion

    def _raise_if_failed(self) -> None:
        if self.completion is not None and self.completion.finish_reason == "error":
            raise LlavaError(self.completion.error)


@dataclass
class _Prepared:
    ids: list[int]
    key: np.ndarray  # ids with image positions replaced by (negative) image-content keys
    images: list  # PIL images in order
    image_keys: list[int]
    image_starts: list[int]  # where each image's tokens begin in ids
    image_counts: list[int]  # how many tokens each image has


@dataclass
class _Row:
    handle: RequestHandle
    prepared: _Prepared
    params: SamplingParams
    max_new: int
    stream: TextStream
    generator: torch.Generator | None
    seen: list[int]
    fed: list[int] = field(default_factory=list)  # generated tokens whose keys are in the cache
    last: int = 0  # the token to feed next
    length: int = 0  # tokens in this row's KV cache
    generated: int = 0
    cached_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None


class _PrefixCache:
    """LRU store of (key sequence, per-layer keys/values) with a budget in tokens."""

    def __init__(self, max_tokens: int, min_reuse: int):
        self.max_tokens = max_tokens
        self.min_reuse = min_reuse
        self.entries: OrderedDict[int, tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self.tokens = 0
        self._ids = itertools.count()

    def lookup(self, key: np.ndarray) -> tuple[int, list | None]:
        """(reusable length, layers) of the longest stored prefix of `key`, leaving one token to prefill."""
        best, best_id = 0, None
        for entry_id, (stored, _) in self.entries.items():
            n = min(len(stored), len(key) - 1)
            if n <= best:
                continue
            differ = np.nonzero(stored[:n] != key[:n])[0]
            common = int(differ[0]) if len(differ) else n
            if common > best:
                best, best_id = common, entry_id
        if best_id is None or best < self.min_reuse:
            return 0, None
        self.entries.move_to_end(best_id)
        layers = self.entries[best_id][1]
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in layers]

    def store(self, key: np.ndarray, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if self.max_tokens <= 0 or len(key) < self.min_reuse or len(key) > self.max_tokens:
            return
        for entry_id, (stored, _) in list(self.entries.items()):
            if len(stored) <= len(key) and np.array_equal(stored, key[:len(stored)]):
                self._drop(entry_id)  # the new entry covers it
        self.entries[next(self._ids)] = (key, layers)
        self.tokens += len(key)
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self.entries)))

    def _drop(self, entry_id: int) -> None:
        stored, _ = self.entries.pop(entry_id)
        self.tokens -= len(stored)


class _GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values live in a buffer with room to spare: a decode step writes
    one column in place, where DynamicLayer copies the whole cache to append it (quadratic in length)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.length = keys.shape[2]
        self._buffers = [self._alloc(keys, self.length + room), self._alloc(values, self.length + room)]
        self._buffers[0][:, :, :self.length] = keys
        self._buffers[1][:, :, :self.length] = values
        self._views()

    @staticmethod
    def _alloc(like: torch.Tensor, capacity: int) -> torch.Tensor:
        batch, heads, _, dim = like.shape
        return like.new_empty(batch, heads, capacity, dim)

    def _views(self) -> None:
        self.keys = self._buffers[0][:, :, :self.length]
        self.values = self._buffers[1][:, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[2]
        if self.length + new > self._buffers[0].shape[2]:  # full: double the room
            grown = [self._alloc(b, 2 * (self.length + new)) for b in self._buffers]
            for g, b in zip(grown, self._buffers):
                g[:, :, :self.length] = b[:, :, :self.length]
            self._buffers = grown
        self._buffers[0][:, :, self.length:self.length + new] = key_states
        self._buffers[1][:, :, self.length:self.length + new] = value_states
        self.length += new
        self._views()
        return self.keys, self.values


def _growing_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], room: int = 64) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [_GrowingLayer(k, v, room) for k, v in layers]
    return cache


class Engine:
    """Serves many requests at once with one model. `submit` returns a RequestHandle at once."""

    def __init__(self, model, processor, *, max_batch_size: int = 32, feature_cache_size: int = 64,
                 prefix_cache_tokens: int = 16384, prefix_min_tokens: int = 16, threaded: bool = True):
        """threaded=False: no thread of its own; the caller runs the loop with `run_forever()`."""
        if max_batch_size < 1:
            raise LlavaError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_batch_size = max_batch_size
        self.context_length = model.context_length
        self.eos = _eos_ids(model, self.tokenizer, None)
        self.image_token_id = model.config.image_token_index
        self.stats = EngineStats()
        self._features: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._feature_cache_size = feature_cache_size
        self._prefix = _PrefixCache(prefix_cache_tokens, max(1, prefix_min_tokens))
        self._waiting: list[_Row] = []
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None  # the batch's keys and values, right-aligned
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._own_thread = False
        self._threaded = threaded

    # -- requests -------------------------------------------------------------------------------------
    def prepare(self, prompt: str, images: list | None = None) -> _Prepared:
        """Tokenize a prompt (image tokens inline) with its images: expanded ids and the cache key."""
        images = list(images or [])
        processor = self.processor
        counts = [processor.num_image_tokens((im.height, im.width)) for im in images]
        text = processor.expand_image_tokens(prompt, counts)
        ids = list(self.tokenizer(text)["input_ids"])
        image_keys = [_image_key(im) for im in images]
        key = np.asarray(ids, dtype=np.int64)
        positions = np.nonzero(key == self.image_token_id)[0]
        if len(positions) != sum(counts):
            raise LlavaError(f"the prompt has {len(positions)} image token positions but its images need "
                             f"{sum(counts)}; is {processor.image_token} part of another word?")
        if len(positions):
            key[positions] = np.repeat(np.asarray([-k for k in image_keys], dtype=np.int64), counts)
        starts = [int(positions[sum(counts[:i])]) for i in range(len(counts))]
        return _Prepared(ids=ids, key=key, images=images, image_keys=image_keys, image_starts=starts,
                         image_counts=counts)

    def submit(self, prompt: str | _Prepared, images: list | None = None, params: SamplingParams | None = None,
               *, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; raises ContextLengthError when the prompt leaves no room to answer."""
        prepared = prompt if isinstance(prompt, _Prepared) else self.prepare(prompt, images)
        params = params or SamplingParams()
        n = len(prepared.ids)
        if n >= self.context_length:
            raise ContextLengthError(f"the prompt is {n} tokens; the model's context length is "
                                     f"{self.context_length}")
        handle = RequestHandle(next(self._ids), n, loop)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        row = _Row(handle=handle, prepared=prepared, params=params,
                   max_new=min(params.max_new_tokens, self.context_length - n),
                   stream=TextStream(self.tokenizer, params.stop), generator=generator, seen=list(prepared.ids))
        with self._lock:
            if self._closed:
                raise LlavaError("the engine is closed")
            self._waiting.append(row)
            self.stats.waiting = len(self._waiting)
            if self._thread is None and self._threaded:
                self._thread = threading.Thread(target=self._run, name="llava-engine", daemon=True)
                self._own_thread = True
                self._thread.start()
            self._lock.notify()
        return handle

    def generate(self, prompts: list[str], images: list[list] | None = None,
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Answers for many prompts at once (images: one list per prompt), in order."""
        images = images or [[] for _ in prompts]
        params = params if isinstance(params, list) else [params] * len(prompts)
        handles = [self.submit(p, im, pa) for p, im, pa in zip(prompts, images, params)]
        return [h.result() for h in handles]

    def run_forever(self) -> None:
        """Run the loop in the calling thread until `close()` (from another thread, or Ctrl-C here).

        Without it the engine starts its own thread at the first `submit`. The main thread is the
        better home on CPU: OpenMP keeps its fast spinning workers for the first thread that used
        them, and a second thread's batched matmuls wait on futexes (measured: 3-4x slower at 16 rows).
        """
        with self._lock:
            if self._thread is not None:
                raise LlavaError("the engine is already running")
            self._thread = threading.current_thread()
        try:
            self._run()
        finally:
            with self._lock:
                self._closed = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._own_thread and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    # -- the loop -------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._rows and not self._closed:
                    self._lock.wait()
                if self._closed:
                    break
                room = self.max_batch_size - len(self._rows)
                joining, self._waiting = self._waiting[:room], self._waiting[room:]
                self.stats.waiting = len(self._waiting)
            with torch.inference_mode():  # the engine never trains: no autograd bookkeeping at all
                for row in joining:
                    self._admit(row)
                if self._rows:
                    try:
                        self._step()
                    except Exception as e:  # noqa: BLE001 - a failed step ends its requests, never the engine
                        for row in self._rows:
                            self._end(row, "error", f"generation failed: {e.__class__.__name__}: {e}")
                        self._rows, self._cache = [], None
            self.stats.running = len(self._rows)
        with torch.inference_mode():
            for row in self._rows + self._waiting:
                self._end(row, "cancelled")
            self._rows, self._waiting, self._cache = [], [], None

    def _admit(self, row: _Row) -> None:
        """Prefill one request (reusing cached features and prefix keys) and sample its first token."""
        if row.handle.cancelled:
            self._end(row, "cancelled")
            return
        try:
            prepared = row.prepared
            n = len(prepared.ids)
            reuse, past = self._prefix.lookup(prepared.key)
            ids = torch.tensor([prepared.ids[reuse:]], device=self.model.device)
            features = self._image_features(prepared, reuse)
            embeds = self.model.embed(ids, image_features=features or None)
            cache = DynamicCache(ddp_cache_data=past) if past is not None else DynamicCache()
            positions = torch.arange(reuse, n, device=self.model.device)[None]
            out = self.model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        except Exception as e:  # noqa: BLE001 - a bad request fails alone
            self._end(row, "error", f"{e.__class__.__name__}: {e}" if not isinstance(e, LlavaError) else str(e))
            return
        row.cached_tokens = reuse
        row.length = n
        self.stats.prompt_tokens += n
        self.stats.cached_prompt_tokens += reuse
        if not self._accept(row, out.logits[:, -1]):
            self._remember(row, out.past_key_values, 0)
            return
        self._join(row, out.past_key_values)

    def _image_features(self, prepared: _Prepared, reuse: int) -> list[torch.Tensor]:
        """Features for the image tokens after the first `reuse` positions (whose keys are cached):
        an image wholly inside the reused prefix needs none, one cut by it only its tail."""
        needed = []  # (image, key, features to skip)
        for image, key, first, count in zip(prepared.images, prepared.image_keys, prepared.image_starts,
                                            prepared.image_counts):
            if first + count > reuse:
                needed.append((image, key, max(0, reuse - first)))
        missing = {key: image for image, key, _ in needed if key not in self._features}
        self.stats.feature_cache_hits += len(needed) - len(missing)
        self.stats.feature_cache_misses += len(missing)
        fresh = {}
        if missing:
            inputs = self.processor(images=list(missing.values()), return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.model.device)
            features = self.model.get_image_features(pixel_values, inputs.get("image_sizes"))
            fresh = dict(zip(missing, features))
        out = []
        for _, key, skip in needed:
            feature = fresh.get(key)
            if feature is None:
                feature = self._features[key]
                self._features.move_to_end(key)
            out.append(feature[skip:])
        if self._feature_cache_size > 0:
            for key, feature in fresh.items():
                self._features[key] = feature
            while len(self._features) > self._feature_cache_size:
                self._features.popitem(last=False)
        return out

    def _join(self, row: _Row, cache: DynamicCache) -> None:
        """Add a prefilled row to the batch, left-padding whichever side is shorter."""
        if self._cache is None:
            self._cache, self._rows = _growing_cache([(x.keys, x.values) for x in cache.layers]), [row]
            return
        width, n = self._cache.get_seq_length(), cache.get_seq_length()
        grow_batch, grow_row = max(0, n - width), max(0, width - n)
        self._cache = _growing_cache([
            (torch.cat([F.pad(old.keys, (0, 0, grow_batch, 0)), F.pad(new.keys, (0, 0, grow_row, 0))], dim=0),
             torch.cat([F.pad(old.values, (0, 0, grow_batch, 0)), F.pad(new.values, (0, 0, grow_row, 0))], dim=0))
            for old, new in zip(self._cache.layers, cache.layers)])
        self._rows.append(row)

    def _step(self) -> None:
        """One decode step for every running row, then drop the rows that have ended."""
        rows, device = self._rows, self.model.device
        width = self._cache.get_seq_length()
        lengths = torch.tensor([r.length for r in rows], device=device)
        # no padding anywhere (one row, or rows of one length): no mask, the attention's fast path
        mask = None if all(r.length == width for r in rows) else \
            (torch.arange(width + 1, device=device)[None] >= (width - lengths)[:, None]).long()
        tokens = torch.tensor([[r.last] for r in rows], device=device)
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=lengths[:, None],
                         past_key_values=self._cache, use_cache=True)
        self.stats.decode_steps += 1
        logits = out.logits[:, -1]
        for r in rows:
            r.fed.append(r.last)
            r.length += 1
        simple = [i for i, r in enumerate(rows) if r.params.greedy and r.params.repetition_penalty == 1.0]
        chosen = dict(zip(simple, logits[simple].argmax(-1).tolist())) if simple else {}
        keep = []
        for i, r in enumerate(rows):
            if r.handle.cancelled:
                self._end(r, "cancelled")
            elif self._accept(r, logits[i:i + 1], chosen.get(i)):
                keep.append(i)
            else:
                self._remember(r, self._cache, i)
        if len(keep) < len(rows):
            self._rows = [rows[i] for i in keep]
            if not self._rows:
                self._cache = None
                return
            index = torch.tensor(keep, device=device)
            cut = width + 1 - max(r.length for r in self._rows)
            self._cache = _growing_cache([
                (layer.keys.index_select(0, index)[:, :, cut:], layer.values.index_select(0, index)[:, :, cut:])
                for layer in self._cache.layers])

    def _accept(self, row: _Row, logits: torch.Tensor, token: int | None = None) -> bool:
        """Choose and hand out the next token; False when the row has ended."""
        if token is None:
            seen = torch.tensor([row.seen], device=logits.device)
            token = int(next_tokens(logits, seen, row.params, row.generator)[0])
        if row.first_token_at is None:
            row.first_token_at = time.perf_counter()
        row.generated += 1
        if token in self.eos and not row.params.ignore_eos:
            self._end(row, "stop")
            return False
        row.seen.append(token)
        delta = row.stream.push(token)
        if delta:
            row.handle._emit(delta)
        if row.stream.stopped:
            self._end(row, "stop")
            return False
        if row.generated >= row.max_new:
            self._end(row, "length")
            return False
        row.last = token
        return True

    def _remember(self, row: _Row, cache: DynamicCache, index: int) -> None:
        """Keep the finished row's keys (prompt + fed answer tokens) for a later prompt with the same prefix."""
        if row.finish_reason not in ("stop", "length") or self._prefix.max_tokens <= 0:
            return
        key = np.concatenate([row.prepared.key, np.asarray(row.fed, dtype=np.int64)])
        start = cache.get_seq_length() - row.length
        kept = [(layer.keys[index:index + 1, :, start:].clone(), layer.values[index:index + 1, :, start:].clone())
                for layer in cache.layers]
        self._prefix.store(key[:row.length], kept)

    def _end(self, row: _Row, reason: str, error: str | None = None) -> None:
        row.finish_reason = reason
        tail = row.stream.finish()
        if tail and reason != "error":
            row.handle._emit(tail)
        self.stats.requests[reason] += 1
        self.stats.completion_tokens += row.generated
        ttft = row.first_token_at - row.handle.created if row.first_token_at is not None else None
        row.handle._finish(Completion(text=row.stream.text, finish_reason=reason,
                                      prompt_tokens=len(row.prepared.ids), completion_tokens=row.generated,
                                      cached_tokens=row.cached_tokens, error=error, time_to_first_token=ttft))


def _image_key(image) -> int:
    """A 62-bit key of an image's mode, size and pixels (so re-encoded copies of one image share it)."""
    digest = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=8)
    digest.update(image.tobytes())
    return int.from_bytes(digest.digest(), "little") >> 2 | 1
