"""The batch plan: which rows each process trains on, in which order, for how many optimizer steps.

Examples are laid end to end into rows (first-fit packing when ``data.packing``, else one example a row); each
epoch shuffles the rows with a seed of (training.seed, epoch) and cuts them into micro-batches, and every process
takes every ``world``-th micro-batch. The order depends only on the seed and the global micro-batch index, so a
resumed run continues exactly where it stopped from its step alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from tunelab.config import ConfigError, TunelabConfig
from tunelab.data import PreparedData, TokenizedExample, epoch_batches, pack_rows, single_rows

Row = list[TokenizedExample]  # the examples laid end to end in one row of a micro-batch


@dataclass
class Plan:
    rows: list[Row]
    batches_per_epoch: int  # micro-batches per epoch on this process
    total_steps: int
    seed: int
    micro_batch_size: int
    group_by_length: bool
    rank: int
    world: int

    def epoch(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of one epoch, each a list of row indices."""
        lengths = [sum(len(e.input_ids) for e in row) for row in self.rows]
        batches = epoch_batches(lengths, self.micro_batch_size, self.seed, epoch, self.group_by_length)
        usable = len(batches) - len(batches) % self.world  # every process gets the same number of batches
        return batches[:usable][self.rank :: self.world]

    def micro_batches(self, start: int) -> Iterator[list[Row]]:
        """Rows of each micro-batch from global micro-batch index ``start`` on: resuming needs only the step."""
        index, cached_epoch, batches = start, -1, []
        while True:
            epoch, position = divmod(index, self.batches_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, batches = epoch, self.epoch(epoch)
            yield [self.rows[r] for r in batches[position]]
            index += 1


def make_plan(config: TunelabConfig, data: PreparedData, rank: int, world: int) -> Plan:
    lengths = [len(e.input_ids) for e in data.train]
    row_indices = pack_rows(lengths, config.data.max_length) if config.data.packing else single_rows(len(lengths))
    rows = [[data.train[i] for i in row] for row in row_indices]
    per_epoch = len(rows) // config.training.micro_batch_size + bool(len(rows) % config.training.micro_batch_size)
    per_epoch = per_epoch // world
    if per_epoch < 1:
        raise ConfigError(f"{len(rows)} training rows are fewer than one micro-batch per process; lower training.micro_batch_size")
    # an online objective may train num_iterations optimizer steps on each window of rollouts
    reuse = getattr(config.objective, "num_iterations", 1)
    steps = config.training.max_steps or math.ceil(config.training.epochs * per_epoch / config.training.grad_accum) * reuse
    return Plan(rows, per_epoch, steps, config.training.seed, config.training.micro_batch_size,
                not config.data.packing, rank, world)
