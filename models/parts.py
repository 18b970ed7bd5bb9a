"""The parts of a ``diffusers.UNet2DModel``, for exchanging only some of them.

A part is a group of modules: ``time_embedding``, ``conv_in``, ``down_blocks.N``,
``mid_block``, ``up_blocks.N`` and ``head`` (``conv_norm_out`` and ``conv_out``).
``down_blocks`` and ``up_blocks`` name every block of that side. The three sides
of the FedDiffuse paper (de Goede et al. 2024, arXiv 2406.12575) are

* ``down``: ``conv_in``, ``time_embedding`` and every down block (the encoder
  with the time embedding, as in the paper's UNet);
* ``mid``: the mid block (the latent);
* ``up``: every up block and the output head (the decoder).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

HEAD_MODULES = ("conv_norm_out", "conv_out")
SIDES = {
    "down": ("conv_in", "time_embedding", "down_blocks"),
    "mid": ("mid_block",),
    "up": ("up_blocks", "head"),
}
# Parts shared with the server by each preset (the rest stays on the clients).
PRESETS = {
    "udec": SIDES["up"],
    "ulatdec": SIDES["mid"] + SIDES["up"],
    "usplit": SIDES["down"] + SIDES["mid"] + SIDES["up"],
}


def part_of(name: str) -> str:
    """The part a parameter belongs to: ``down_blocks.1.resnets.0.conv1.weight`` -> ``down_blocks.1``."""
    first, _, rest = name.partition(".")
    if first in ("down_blocks", "up_blocks"):
        return f"{first}.{rest.partition('.')[0]}"
    if first in HEAD_MODULES:
        return "head"
    return first


def parts_of(names: Iterable[str]) -> list[str]:
    """The distinct parts of ``names``, in model order."""
    return list(dict.fromkeys(part_of(n) for n in names))


def expand(selection: Sequence[str], names: Iterable[str]) -> list[str]:
    """The concrete parts named by ``selection`` (``up_blocks`` -> every ``up_blocks.N``), in model order.

    Raises ``ValueError`` naming an entry that matches no part of the model.
    """
    available = parts_of(names)
    chosen = []
    for entry in selection:
        matches = [p for p in available if p == entry or p.startswith(f"{entry}.")]
        if not matches:
            raise ValueError(f"{entry!r} is no part of this UNet; its parts are {available}")
        chosen += matches
    return [p for p in available if p in chosen]


def names_in(parts: Iterable[str], names: Iterable[str]) -> list[str]:
    """The parameter names (in ``names`` order) that belong to ``parts``."""
    wanted = set(parts)
    return [n for n in names if part_of(n) in wanted]


def parameter_fraction(parts: Iterable[str], sizes: Mapping[str, int]) -> float:
    """Share of the parameters (``sizes``: name -> number of values) inside ``parts``."""
    total = sum(sizes.values())
    return sum(sizes[n] for n in names_in(parts, sizes)) / total if total else 0.0


def usplit_assignment(
    sizes: Mapping[str, int],
    *,
    num_partitions: int,
    ways: int,
    seed: int,
    server_round: int,
    members: Sequence[int] | None = None,
) -> dict[int, list[str]]:
    """The parts each client (by partition id) sends back in a USplit round.

    The round's clients are partitions ``0..num_partitions-1``, or, when the
    server samples clients, the sampled partitions ``members``. They are
    shuffled (``seed``, ``server_round``) into groups of ``ways``;
    within a group every part is sent by exactly one member, so the group sends
    one model's worth of parameters. ``ways = 2`` is the paper's USplit: one
    member sends the down side, the other the up side, and the mid block goes
    to one of them at random; a member left without a partner sends the mid
    block and a random side. ``ways > 2`` balances the single parts (down and
    up blocks, mid block, head, ...) over the members by parameter count. Every
    client computes the same assignment, so it needs no message of its own.
    """
    if ways < 2:
        raise ValueError(f"split_ways={ways} must be >= 2")
    names = list(sizes)
    members = list(range(num_partitions)) if members is None else sorted(int(m) for m in members)
    rng = np.random.default_rng([seed, server_round])
    # Without sampling the members are 0..n-1 and this is the permutation itself.
    order = [members[int(i)] for i in rng.permutation(len(members))]
    if len(members) == 1:
        return {members[0]: parts_of(names)}
    side = {k: expand(v, names) for k, v in SIDES.items()}
    part_size = {p: sum(sizes[n] for n in names_in([p], names)) for p in parts_of(names)}
    assignment: dict[int, list[str]] = {}
    for start in range(0, len(order), ways):
        group = order[start : start + ways]
        if ways == 2 and len(group) == 2:
            down_member, up_member = group
            mid_member = group[int(rng.integers(2))]
            assignment[down_member] = side["down"] + (side["mid"] if mid_member == down_member else [])
            assignment[up_member] = (side["mid"] if mid_member == up_member else []) + side["up"]
        elif ways == 2:
            assignment[group[0]] = side["mid"] + side[("down", "up")[int(rng.integers(2))]]
        else:
            load = {m: 0 for m in group}
            chosen: dict[int, list[str]] = {m: [] for m in group}
            for part in sorted(part_size, key=lambda p: -part_size[p]):
                lightest = min(group, key=lambda m: load[m])
                chosen[lightest].append(part)
                load[lightest] += part_size[part]
            assignment.update({m: [p for p in part_size if p in chosen[m]] for m in group})
    return assignment
