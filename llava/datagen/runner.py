"""The resumable data-generation run: every (kind, context) is asked once, concurrently, and its record
written exactly once, however often the run is killed and restarted.

Each kind has its own JSONL file in the output folder; a line is appended (and flushed) as soon as its
reply is parsed. A restart reads those files (dropping a half-written last line), skips what is done,
and asks only for the rest. Replies that fail parsing are re-asked up to `attempts` times, then
logged in `rejects.jsonl` (and count as done). `finish` writes the LLaVA JSON of all kinds."""

from __future__ import annotations

import json
import os
import random
import threading
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import DataError
from ..core.io import atomic_write_text, read_rows
from .context import Context
from .parse import RejectedResponse, parse_response, to_record
from .prompts import KINDS
from .teachers import TeacherUnavailable

REJECTS = "rejects.jsonl"


@dataclass
class RunSummary:
    written: Counter = field(default_factory=Counter)   # new records this run, per kind
    skipped: Counter = field(default_factory=Counter)   # already done before this run, per kind
    rejected: Counter = field(default_factory=Counter)  # given up this run, per reason
    failed: int = 0                                     # teacher unavailable: left for the next run
    errors: list[str] = field(default_factory=list)


class _Writer:
    """Appends lines to the per-kind files; one lock, one flush + fsync per line."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.lock = threading.Lock()
        self.files: dict[str, object] = {}

    def write(self, name: str, row: dict) -> None:
        with self.lock:
            f = self.files.get(name)
            if f is None:
                f = self.files[name] = open(self.folder / name, "a")
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def run(contexts: list[Context], teacher, output: str | Path, kinds: tuple[str, ...] = KINDS,
        concurrency: int = 4, attempts: int = 2, seed: int = 0, progress: bool = False,
        log=None) -> RunSummary:
    """Ask `teacher` for every (kind, context) not yet in `output`; see the module docstring."""
    from tqdm import tqdm

    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise DataError(f"unknown kind {unknown[0]!r}; use {', '.join(KINDS)}")
    ids = [c.id for c in contexts]
    if len(set(ids)) != len(ids):
        raise DataError("two contexts have the same id; every image needs its own id")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    summary = RunSummary()
    rejected = {(row["kind"], row["id"]) for row in read_rows(output / REJECTS)}
    todo = []
    for kind in kinds:
        done = {row["id"] for row in read_rows(output / f"{kind}.jsonl")} | {i for k, i in rejected if k == kind}
        for context in contexts:
            if context.id in done:
                summary.skipped[kind] += 1
            else:
                todo.append((kind, context))
    writer = _Writer(output)

    def work(kind: str, context: Context):
        last = None
        for attempt in range(attempts):
            text = teacher.respond(kind, context)
            try:
                turns = parse_response(kind, text)
            except RejectedResponse as e:
                last = (str(e), text)
                continue
            rng = random.Random(f"{seed}-{kind}-{context.id}-record")
            writer.write(f"{kind}.jsonl", to_record(kind, context, turns, rng))
            return None
        writer.write(REJECTS, {"kind": kind, "id": context.id, "reason": last[0], "response": last[1]})
        return last[0]

    bar = tqdm(total=len(todo), desc="datagen", disable=not progress, unit="ctx")
    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            pending = {}
            queue = iter(todo)
            for item in queue:  # keep at most 2 x concurrency in flight, so a kill loses little
                pending[pool.submit(work, *item)] = item
                if len(pending) >= 2 * max(1, concurrency):
                    break
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    kind, context = pending.pop(future)
                    try:
                        reason = future.result()
                    except TeacherUnavailable as e:
                        summary.failed += 1
                        if len(summary.errors) < 5:
                            summary.errors.append(str(e))
                    else:
                        if reason is None:
                            summary.written[kind] += 1
                        else:
                            summary.rejected[reason.split(":")[0]] += 1
                            if log:
                                log(f"rejected {kind} {context.id}: {reason}")
                    bar.update()
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending[pool.submit(work, *nxt)] = nxt
    finally:
        bar.close()
        writer.close()
    return summary


def merged_records(output: str | Path, kinds: tuple[str, ...] = KINDS, seed: int = 0,
                   extra: list[dict] | None = None) -> list[dict]:
    """All kinds' records (plus `extra` ones), shuffled with `seed`."""
    records = []
    for kind in kinds:
        records += read_rows(Path(output) / f"{kind}.jsonl")
    records += extra or []
    random.Random(seed).shuffle(records)
    return records


def finish(output: str | Path, kinds: tuple[str, ...] = KINDS, name: str = "llava_instruct.json",
           seed: int = 0, extra: list[dict] | None = None) -> Path:
    """merged_records as one LLaVA JSON file."""
    target = Path(output) / name
    atomic_write_text(target, json.dumps(merged_records(output, kinds, seed=seed, extra=extra)))
    return target
