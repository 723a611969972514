"""LLaVA-1.5's modality- and length-grouped sampling (`group_by_modality_length`) and the split of
one epoch's order into per-process batches.

The index functions are the original's (llava/train/llava_trainer.py), same names, same arguments,
same output for the same random state: megabatches of world_size * batch_size samples, sorted by
length inside, dealt to processes in chunks of even total length; image and text-only samples never
share a megabatch (except the one leftover megabatch). As in the original, the inner shuffles of
the modality split draw from torch's global generator; LengthGroupedSampler seeds that generator
(and restores it afterwards) so an epoch's order depends only on (seed, epoch).
"""

from __future__ import annotations

import torch


def split_to_even_chunks(indices, lengths, num_chunks):
    """Split indices into num_chunks chunks of (nearly) equal total length."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    num_indices_per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    chunks_lengths = [0 for _ in range(num_chunks)]
    for index in indices:
        shortest_chunk = chunks_lengths.index(min(chunks_lengths))
        chunks[shortest_chunk].append(index)
        chunks_lengths[shortest_chunk] += lengths[index]
        if len(chunks[shortest_chunk]) == num_indices_per_chunk:
            chunks_lengths[shortest_chunk] = float("inf")
    return chunks


def get_length_grouped_indices(lengths, batch_size, world_size, generator=None, merge=True):
    """A random order in which each megabatch is sorted longest first and split evenly over processes."""
    indices = torch.randperm(len(lengths), generator=generator)
    megabatch_size = world_size * batch_size
    megabatches = [indices[i: i + megabatch_size].tolist() for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(megabatch, key=lambda i: lengths[i], reverse=True) for megabatch in megabatches]
    megabatches = [split_to_even_chunks(megabatch, lengths, world_size) for megabatch in megabatches]
    return [i for megabatch in megabatches for batch in megabatch for i in batch]


def get_modality_length_grouped_indices(lengths, batch_size, world_size, generator=None):
    """Like get_length_grouped_indices, but image samples (length > 0) and text-only samples (length < 0)
    go into separate megabatches; the two leftover megabatches are merged into one final megabatch."""
    if not all(length != 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero (positive: image samples, negative: text-only)")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        # all one modality
        return get_length_grouped_indices(lengths, batch_size, world_size, generator=generator)
    mm_indices, mm_lengths = zip(*[(i, length) for i, length in enumerate(lengths) if length > 0])
    lang_indices, lang_lengths = zip(*[(i, -length) for i, length in enumerate(lengths) if length < 0])

    mm_shuffle = [mm_indices[i] for i in get_length_grouped_indices(mm_lengths, batch_size, world_size, generator=None)]
    lang_shuffle = [lang_indices[i] for i in get_length_grouped_indices(lang_lengths, batch_size, world_size,
                                                                        generator=None)]
    megabatch_size = world_size * batch_size
    mm_megabatches = [mm_shuffle[i: i + megabatch_size] for i in range(0, len(mm_shuffle), megabatch_size)]
    lang_megabatches = [lang_shuffle[i: i + megabatch_size] for i in range(0, len(lang_shuffle), megabatch_size)]

    last_mm = mm_megabatches[-1]
    last_lang = lang_megabatches[-1]
    additional_batch = last_mm + last_lang
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    megabatch_indices = torch.randperm(len(megabatches), generator=generator)
    megabatches = [megabatches[i] for i in megabatch_indices]

    if len(additional_batch) > 0:
        megabatches.append(sorted(additional_batch))

    return [i for megabatch in megabatches for i in megabatch]


class LengthGroupedSampler(torch.utils.data.Sampler):
    """The epoch's full order of sample indices (all processes), a pure function of (seed, epoch).

    lengths: per-sample lengths; with group_by_modality, negative for text-only samples.
    Without grouping (group_by_length=False) the order is a plain seeded permutation.
    """

    def __init__(self, lengths, batch_size: int, world_size: int = 1, seed: int = 0,
                 group_by_length: bool = True, group_by_modality: bool = False):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.group_by_modality = group_by_modality
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def order(self, epoch: int | None = None) -> list[int]:
        seed = self.seed * 1_000_003 + (self.epoch if epoch is None else epoch)
        generator = torch.Generator().manual_seed(seed)
        if not self.group_by_length:
            return torch.randperm(len(self.lengths), generator=generator).tolist()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)  # the original's inner shuffles use the global generator
            if self.group_by_modality:
                return get_modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator)
            return get_length_grouped_indices([abs(x) for x in self.lengths], self.batch_size, self.world_size,
                                              generator)

    def __iter__(self):
        return iter(self.order())


def rank_batches(order: list[int], batch_size: int, world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """This process's batches of one epoch: batch j of megabatch k is order[k*W*B + r*B : ... + B].

    With several processes a short last megabatch is filled from the start of the order, so every
    process runs the same number of batches (as accelerate's even_batches does); with one process
    the last batch is just shorter.
    """
    megabatch = batch_size * world_size
    if world_size > 1 and len(order) % megabatch:
        fill = megabatch - len(order) % megabatch
        order = list(order) + [order[i % len(order)] for i in range(fill)]
    batches = []
    for start in range(0, len(order), megabatch):
        chunk = order[start + rank * batch_size: start + (rank + 1) * batch_size]
        if chunk:
            batches.append(chunk)
    return batches
