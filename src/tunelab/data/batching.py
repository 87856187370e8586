"""Rows, batches and the collate function.

A *row* is a list of examples laid end to end. With packing, rows hold several examples (first-fit decreasing
into ``max_length``); without it, one example each, and batches are grouped by length to limit padding.

The collate function never builds an attention mask. Position ids restart at 0 for every example, and
transformers' mask builder (``masking_utils.find_packed_sequence_indices``) turns each restart into a
block-diagonal causal mask, so no example attends to another; flash-attention uses the same position ids for
its variable-length kernel. Right padding is one more "example" of pad tokens with no labels, which only
attends to itself.

Targets are shifted per example *before* examples are concatenated: the last token of example A must not be
asked to predict the first token of example B.

Multi-task data (examples with a ``task``) adds two tensors the model side can read: ``token_task_ids`` (B, T),
the task index of every token (-1 on padding), exact even when a packed row mixes tasks; and ``task_ids`` (B,),
the task of each row, which is -1 when the row mixes tasks (only possible with packing). A technique that gates
or conditions per sequence reads ``task_ids`` and therefore refuses packing.
"""

from __future__ import annotations

import random

import torch

from tunelab.data.tokenize import IGNORE, NO_TASK, TokenizedExample

Row = list[int]  # indices of examples in one row


def pack_rows(lengths: list[int], max_length: int) -> list[Row]:
    """First-fit decreasing bin packing of example lengths into rows of at most ``max_length`` tokens.

    Deterministic for the same lengths (ties broken by index), so resumed runs see the same rows. Each example
    goes into the first (oldest) row with room for it, found in O(log n) by a max-tree over the rows' free room:
    O(n log n) in all, where scanning the rows for each example took O(n^2) (minutes for 200k examples).
    Written by hand because no library on this stack offers first-fit packing (TRL's best-fit packer is a
    different algorithm, with different rows). An example longer than ``max_length`` gets a row of its own.
    """
    leaves = 1
    while leaves < len(lengths):
        leaves *= 2
    # room[k]: the most free room among the rows under tree node k; rows are the leaves room[leaves + r], and rows
    # not opened yet have all of max_length free, so the first row with room is an open one or the next new one.
    room = [max_length] * (2 * leaves)
    rows: list[Row] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[index]
        if room[1] >= size:
            node = 1
            while node < leaves:  # descend to the leftmost leaf with enough room
                node = 2 * node if room[2 * node] >= size else 2 * node + 1
        else:  # fits no row, not even an empty one: a row of its own
            node = leaves + len(rows)
        slot = node - leaves
        if slot == len(rows):
            rows.append([])
        rows[slot].append(index)
        room[node] -= size
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return rows


def single_rows(count: int) -> list[Row]:
    return [[i] for i in range(count)]


def epoch_batches(row_lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The batches (lists of row indices) of one epoch: a seeded shuffle, optionally grouped by length.

    Length grouping sorts within mega-batches of 64 batches, then shuffles the batches, like
    transformers' ``group_by_length``: similar lengths share a batch but the order stays random.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(row_lengths)))
    rng.shuffle(order)
    if group_by_length:
        mega = batch_size * 64
        order = [i for s in range(0, len(order), mega) for i in sorted(order[s : s + mega], key=lambda i: -row_lengths[i])]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def collate(rows: list[list[TokenizedExample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of examples -> input_ids, position_ids and shifted targets, each (B, T); with multi-task data also
    token_task_ids (B, T) and task_ids (B,) (see the module docstring)."""
    ids_rows, pos_rows, tgt_rows, task_rows = [], [], [], []
    for row in rows:
        ids, pos, tgt, tasks = [], [], [], []
        for example in row:
            ids += example.input_ids
            pos += range(len(example.input_ids))
            tgt += example.labels[1:] + [IGNORE]  # position t predicts token t+1 of the same example only
            tasks += [example.task_id] * len(example.input_ids)
        ids_rows.append(ids)
        pos_rows.append(pos)
        tgt_rows.append(tgt)
        task_rows.append(tasks)
    width = max(len(ids) for ids in ids_rows)
    for ids, pos, tgt, tasks in zip(ids_rows, pos_rows, tgt_rows, task_rows):
        pad = width - len(ids)
        ids += [pad_id] * pad
        pos += range(pad)  # padding is its own segment: it restarts positions and so attends only to itself
        tgt += [IGNORE] * pad
        tasks += [NO_TASK] * pad
    batch = {
        "input_ids": torch.tensor(ids_rows, dtype=torch.long),
        "position_ids": torch.tensor(pos_rows, dtype=torch.long),
        "targets": torch.tensor(tgt_rows, dtype=torch.long),
    }
    if any(example.task_id != NO_TASK for row in rows for example in row):
        batch["token_task_ids"] = torch.tensor(task_rows, dtype=torch.long)  # (B, T)
        batch["task_ids"] = torch.tensor([_row_task(row) for row in rows], dtype=torch.long)  # (B,)
    return batch


def _row_task(row: list[TokenizedExample]) -> int:
    """The row's task index, or NO_TASK when its examples belong to different tasks (a packed row)."""
    tasks = {example.task_id for example in row}
    return tasks.pop() if len(tasks) == 1 else NO_TASK
