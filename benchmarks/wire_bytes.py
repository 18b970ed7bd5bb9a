"""Bytes on the wire per client per round: fp32 vs quant (8, 4, 2, 1 bits, top-k), partial, SecAgg+, downlinks.

    python benchmarks/wire_bytes.py [--quick]

For each paper UNet (fashion_mnist, cifar10, celeba) the benchmark builds the
messages the strategies really send: the downlink ArrayRecord of
``configure_train`` and a client's uplink reply (full weights for vanilla;
``client_app.updates.quantized_update`` of a realistic update for quant, int8
or packed 4-, 2- and 1-bit codes, or top-k 1 % and 10 % with float32 or int8
values, in the second round so that error feedback has a residual; partial
exchange fp32, int8 and 4-bit, and USplit 4-way also 1-bit and top-k; each
``strategy.downlink`` with quant and with partial USplit 4-way, whose rows
count the whole message, config included). It
counts two sizes: ``payload`` (the arrays' serialized npy buffers, what
``metrics.jsonl`` records) and ``serialized`` (Flower's deflated object tree:
record, arrays and chunks, what the transport carries). ``--quick`` measures
fashion_mnist only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, write_results  # noqa: E402
from client_app.app import secagg_mod  # noqa: E402
from client_app.partial import reply_arrays  # noqa: E402
from client_app.updates import quantized_update  # noqa: E402
from feddm.local_grid import LocalGrid  # noqa: E402
from models import build_unet  # noqa: E402
from server_app.config import compose_config  # noqa: E402
from strategies import build_strategy  # noqa: E402
from strategies.codec import payload_nbytes  # noqa: E402
from strategies.packing import packed_if_asked  # noqa: E402
from strategies.secagg import recorddict_nbytes  # noqa: E402

GEOMETRY = {"fashion_mnist": (28, 1), "cifar10": (32, 3), "celeba": (64, 3)}
VARIANTS = {
    "fp32 (vanilla)": None,
    "int8 per-channel": {"granularity": "channel", "error_feedback": False},
    "int8 per-tensor": {"granularity": "tensor", "error_feedback": False},
    "int8 per-channel + error feedback": {"granularity": "channel", "error_feedback": True},
    "int4 per-channel (packed)": {"granularity": "channel", "error_feedback": False, "bits": 4},
    "int2 per-channel (packed)": {"granularity": "channel", "error_feedback": False, "bits": 2},
    "1-bit sign per-channel (packed)": {"granularity": "channel", "error_feedback": False, "bits": 1},
}
# Top-k (strategy.topk): the fraction kept, and the values as float32 or as int8 codes.
TOPK = {
    "top-k 1 %": {"topk": 0.01, "topk_values": "float32"},
    "top-k 1 % + int8": {"topk": 0.01, "topk_values": "quantized"},
    "top-k 10 %": {"topk": 0.1, "topk_values": "float32"},
    "top-k 10 % + int8": {"topk": 0.1, "topk_values": "quantized"},
}
VARIANTS |= {name: {"granularity": "channel", "error_feedback": False} | o for name, o in TOPK.items()}
# Partial exchange's codes: none (fp32), int8 and packed 4-bit for every preset; 1-bit and top-k for USplit 4-way.
PARTIAL_CODES = {"": {"quantize": False}, " + int8": {"bits": 8}, " + int4": {"bits": 4}}
USPLIT4_CODES = {" + 1-bit": {"bits": 1}} | {f" + {name}": o for name, o in TOPK.items()}


def serialized_nbytes(obj) -> int:
    """Bytes of Flower's deflated object tree (each distinct object once, as sent)."""
    return len(obj.deflate()) + sum(serialized_nbytes(c) for c in (obj.children or {}).values())


class _OneNode:
    def get_node_ids(self):
        return [1]


# Partial-UNet exchange (strategy=partial): preset, options, label.
PARTIAL_VARIANTS = [
    ("udec", {}, "partial udec"),
    ("ulatdec", {}, "partial ulatdec"),
    ("usplit", {"split_ways": 2}, "partial usplit (pairs)"),
    ("usplit", {"split_ways": 4}, "partial usplit (4-way)"),
]
PARTIAL_CLIENTS = 4  # USplit's share per client depends on the group: averaged over 4 clients


def measure_partial(global_state: dict, local_state: dict) -> dict:
    """Uplink and steady-state downlink per client (mean of 4 clients) of each partial variant, fp32 and coded."""
    rows = {}
    for preset, options, label in PARTIAL_VARIANTS:
        codes = PARTIAL_CODES | (USPLIT4_CODES if options.get("split_ways") == 4 else {})
        for suffix, code in codes.items():
            strategy = build_strategy(
                {
                    "name": "partial",
                    "preset": preset,
                    "shared": None,
                    "split_ways": options.get("split_ways", 2),
                    "quantize": True,
                    "bits": 8,
                    "granularity": "channel",
                    "stochastic_rounding": False,
                    "error_feedback": False,
                }
                | code,
                num_clients=1,
            )
            grid = _Nodes(PARTIAL_CLIENTS)
            strategy.configure_train(
                1, ArrayRecord(global_state), ConfigRecord(), grid
            )  # first contact: whole model
            parts = strategy.encoding
            parts._initialized = set(grid.get_node_ids())  # as after a round in which every node trained
            messages = list(strategy.configure_train(2, ArrayRecord(global_state), ConfigRecord(), grid))
            config = dict(messages[0].content["config"])
            uplinks = [
                packed_if_asked(
                    reply_arrays(
                        local_state,
                        global_state,
                        config,
                        RecordDict(),
                        partition_id=p,
                        num_partitions=PARTIAL_CLIENTS,
                        seed=p,
                    ),
                    config,
                )
                for p in range(PARTIAL_CLIENTS)
            ]
            rows[label + suffix] = {
                "uplink_payload_bytes": sum(payload_nbytes(u) for u in uplinks) / PARTIAL_CLIENTS,
                "uplink_serialized_bytes": sum(serialized_nbytes(u) for u in uplinks) / PARTIAL_CLIENTS,
                "downlink_payload_bytes": payload_nbytes(messages[0].content["arrays"]),
                "downlink_serialized_bytes": serialized_nbytes(messages[0].content["arrays"]),
                "shared_fraction": sum(v.numel() for k, v in global_state.items() if k in parts.shared_names)
                / sum(v.numel() for v in global_state.values()),
            }
    return rows


# strategy.downlink's forms, measured in round 2 after a round in which every node trained: a node
# that took part gets the form itself, one that missed round 1 what int8_delta sends it instead.
DOWNLINK_BASES = {
    "quant": {"name": "quant"},
    "partial usplit (4-way) + int8": {
        "name": "partial",
        "preset": "usplit",
        "shared": None,
        "split_ways": 4,
        "quantize": True,
    },
}
DOWNLINK_ROWS = {
    "weights": "weights",
    "int8_weights": "int8_weights",
    "int8_delta (steady state)": "int8_delta",
    "int8_delta (missed last round: full weights)": "int8_delta",
}


def measure_downlink(global_state: dict, local_state: dict, uplinks: dict) -> dict:
    """Downlink bytes per client of each ``strategy.downlink`` form, with quant and with partial USplit 4-way.

    Round 1 goes out, every node then counts as having trained (as after a
    round with no failure), and the global model moves to ``local_state`` (a
    plausible round's change): round 2's message to node 1 is the steady
    state; one to a node that was not in round 1 is what int8_delta sends a
    node that missed it. Sizes are of the whole message content (arrays and
    config, the hashes included). ``uplinks``: each base's uplink row.
    """
    rows = {}
    codec = {"bits": 8, "granularity": "channel", "stochastic_rounding": False, "error_feedback": False}
    for base, options in DOWNLINK_BASES.items():
        for label, mode in DOWNLINK_ROWS.items():
            strategy = build_strategy({**codec, **options, "downlink": mode}, num_clients=1)
            grid = _Nodes(PARTIAL_CLIENTS)
            strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), grid)
            nodes = set(grid.get_node_ids())
            strategy.downlink.holders = set(nodes)  # every node's round-1 reply was accepted
            if hasattr(strategy.encoding, "_initialized"):
                strategy.encoding._initialized = set(nodes)
            if "missed" in label:
                strategy.downlink.holders.discard(1)
            messages = strategy.configure_train(2, ArrayRecord(local_state), ConfigRecord(), grid)
            message = next(m for m in messages if m.metadata.dst_node_id == 1)  # Flower shuffles the sample
            rows[f"{base} + downlink {label}"] = {
                "uplink_payload_bytes": uplinks[base]["uplink_payload_bytes"],
                "uplink_serialized_bytes": uplinks[base]["uplink_serialized_bytes"],
                "downlink_payload_bytes": payload_nbytes(message.content["arrays"]),
                "downlink_serialized_bytes": serialized_nbytes(message.content),
            }
    return rows


SECAGG_CLIENTS = 2


def measure_secagg(global_state: dict, local_state: dict) -> dict:
    """Bytes per client of one SecAgg+ round (all four stages), run in-process with Flower's protocol.

    Two clients send the same plausible update through the ClientApp's
    ``secagg_mod``; the server side is ``privacy=secagg`` as configured in
    ``privacy=secagg`` in ``conf/schema.py``.
    """
    privacy = OmegaConf.to_container(compose_config(["privacy=secagg"]).privacy)
    strategy = build_strategy({"name": "vanilla"}, num_clients=SECAGG_CLIENTS, privacy=privacy)

    def train(msg: Message, context: Context) -> Message:
        content = RecordDict(
            {
                "arrays": ArrayRecord(local_state),
                "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 1000}),
            }
        )
        return Message(content=content, reply_to=msg)

    def client(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == "evaluate":
            return Message(
                RecordDict({"metrics": MetricRecord({"eval_loss": 1.0, "num-examples": 1})}), reply_to=msg
            )
        return secagg_mod(msg, context, train)

    grid = LocalGrid(range(1, SECAGG_CLIENTS + 1), client)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(global_state),
        num_rounds=1,
        timeout=3600,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
    )
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    received = [m for m in grid.received if m.metadata.message_type == "train" and not m.has_error()]
    assert len(received) == 4 * SECAGG_CLIENTS, "a SecAgg+ stage failed"
    return {
        "uplink_payload_bytes": sum(recorddict_nbytes(m.content) for m in received) / SECAGG_CLIENTS,
        "uplink_serialized_bytes": sum(serialized_nbytes(m.content) for m in received) / SECAGG_CLIENTS,
        "downlink_payload_bytes": sum(recorddict_nbytes(m.content) for m in sent) / SECAGG_CLIENTS,
        "downlink_serialized_bytes": sum(serialized_nbytes(m.content) for m in sent) / SECAGG_CLIENTS,
    }


class _Nodes:
    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self):
        return list(range(1, self.count + 1))


def measure(model: str) -> dict:
    """Uplink/downlink bytes per client for each variant on one model."""
    size, channels = GEOMETRY[model]
    unet_kwargs = OmegaConf.to_container(compose_config([f"model={model}"]).model.unet)
    torch.manual_seed(0)
    global_state = build_unet(unet_kwargs, image_size=size, channels=channels).state_dict()
    # A plausible local update: small, weight-proportional changes.
    generator = torch.Generator().manual_seed(1)
    local_state = {
        k: v + 1e-3 * (v.abs().mean() + 1e-4) * torch.randn(v.shape, generator=generator)
        for k, v in global_state.items()
    }
    rows = {}
    for name, options in VARIANTS.items():
        if options is None:
            strategy = build_strategy({"name": "vanilla"}, num_clients=1)
        else:
            quant = {"name": "quant", "bits": 8, "stochastic_rounding": False}
            strategy = build_strategy(quant | options, num_clients=1)
        (message,) = strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), _OneNode())
        downlink = message.content["arrays"]
        if options is None:  # full weights, packed as the server asks (strategies.packing)
            uplink = packed_if_asked(ArrayRecord(local_state), message.content["config"])
        else:  # the client's settings as the strategy sends them
            config, state = dict(message.content["config"]), RecordDict()
            quantized_update(local_state, global_state, config, state, seed=0)  # round 1 fills the residual
            uplink = quantized_update(local_state, global_state, config, state, seed=1)
        rows[name] = {
            "uplink_payload_bytes": payload_nbytes(uplink),
            "uplink_serialized_bytes": serialized_nbytes(uplink),
            "downlink_payload_bytes": payload_nbytes(downlink),
            "downlink_serialized_bytes": serialized_nbytes(downlink),
        }
    rows.update(measure_partial(global_state, local_state))
    rows["SecAgg+ (4 stages, int64 masked)"] = measure_secagg(global_state, local_state)
    uplinks = {
        "quant": rows["int8 per-channel"],
        "partial usplit (4-way) + int8": rows["partial usplit (4-way) + int8"],
    }
    rows.update(measure_downlink(global_state, local_state, uplinks))
    fp32 = rows["fp32 (vanilla)"]["uplink_serialized_bytes"]

    def downlink_ratio(base: str, label: str) -> float:
        """How many times fewer bytes a client receives with ``label`` than with fp32 weights."""
        weights = rows[f"{base} + downlink weights"]["downlink_serialized_bytes"]
        return round(weights / rows[f"{base} + downlink {label}"]["downlink_serialized_bytes"], 4)

    return {
        "parameters": int(sum(v.numel() for v in global_state.values())),
        "variants": rows,
        "downlink_int8_serialized_bytes": rows["quant + downlink int8_weights"]["downlink_serialized_bytes"],
        "ratio_int8_vs_fp32": round(fp32 / rows["int8 per-channel"]["uplink_serialized_bytes"], 4),
        "ratio_int8_tensor_vs_fp32": round(fp32 / rows["int8 per-tensor"]["uplink_serialized_bytes"], 4),
        "ratio_int4_vs_fp32": round(fp32 / rows["int4 per-channel (packed)"]["uplink_serialized_bytes"], 4),
        "ratio_int2_vs_fp32": round(fp32 / rows["int2 per-channel (packed)"]["uplink_serialized_bytes"], 4),
        "ratio_1bit_vs_fp32": round(
            fp32 / rows["1-bit sign per-channel (packed)"]["uplink_serialized_bytes"], 4
        ),
        **{
            f"ratio_topk{round(o['topk'] * 100)}{'_int8' if o['topk_values'] == 'quantized' else ''}_vs_fp32": round(
                fp32 / rows[name]["uplink_serialized_bytes"], 3
            )
            for name, o in TOPK.items()
        },
        "ratio_best_combined_vs_fp32": max(
            (round(fp32 / v["uplink_serialized_bytes"], 3), name) for name, v in rows.items()
        ),
        "ratio_int8_downlink_vs_fp32": downlink_ratio("quant", "int8_weights"),
        "ratio_downlink_int8_delta_vs_fp32": downlink_ratio("quant", "int8_delta (steady state)"),
        "ratio_downlink_int8_delta_usplit4_vs_fp32": downlink_ratio(
            "partial usplit (4-way) + int8", "int8_delta (steady state)"
        ),
        "partial_uplink_ratio_vs_fp32": {
            name: round(fp32 / v["uplink_serialized_bytes"], 3)
            for name, v in rows.items()
            if name.startswith("partial")
        },
    }


def _uplink(result: dict, variant: str) -> int:
    """Serialized uplink bytes of one variant of a model's result."""
    return result["variants"][variant]["uplink_serialized_bytes"]


def fp32_ratio(result: dict, variant: str) -> float:
    """How many times fewer serialized uplink bytes than fp32 one variant of a model's result sends."""
    return _uplink(result, "fp32 (vanilla)") / _uplink(result, variant)


def main() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # Messages built outside a running app need these ids (Flower reads them globally).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fashion_mnist only")
    args = parser.parse_args()
    models = ["fashion_mnist"] if args.quick else list(GEOMETRY)
    results = {model: measure(model) for model in models}
    rows = []
    for model, r in results.items():
        for name, v in r["variants"].items():
            rows.append(
                [
                    model,
                    f"{r['parameters'] / 1e6:.1f}M",
                    name,
                    f"{v['uplink_serialized_bytes'] / 1e6:.2f}",
                    f"{v['downlink_serialized_bytes'] / 1e6:.2f}",
                    f"{r['variants']['fp32 (vanilla)']['uplink_serialized_bytes'] / v['uplink_serialized_bytes']:.3f}",
                ]
            )
    table = markdown_table(
        [
            "model",
            "params",
            "variant",
            "uplink MB/client/round",
            "downlink MB/client/round",
            "uplink ratio vs fp32",
        ],
        rows,
    )
    best = {
        m: max(r["partial_uplink_ratio_vs_fp32"].items(), key=lambda kv: kv[1]) for m, r in results.items()
    }
    met = all(r["ratio_int8_vs_fp32"] >= 3.9 for r in results.values())
    met4 = all(r["ratio_int4_vs_fp32"] >= 7.5 for r in results.values())
    met_delta = all(r["ratio_downlink_int8_delta_vs_fp32"] >= 3.9 for r in results.values())
    notes = (
        "Target: int8 per-channel uplink >= 3.9x smaller than fp32 -- "
        + (
            "met for every model."
            if met
            else "MISSED for: " + ", ".join(m for m, r in results.items() if r["ratio_int8_vs_fp32"] < 3.9)
        )
        + "\nTarget (bytes half): packed 4-bit uplink >= 7.5x smaller than fp32 -- "
        + ("met" if met4 else "MISSED")
        + ": "
        + ", ".join(
            f"{m} int4 {r['ratio_int4_vs_fp32']:.2f}x, int2 {r['ratio_int2_vs_fp32']:.2f}x, 1-bit "
            f"{r['ratio_1bit_vs_fp32']:.2f}x; best combination {r['ratio_best_combined_vs_fp32'][1]} "
            f"{r['ratio_best_combined_vs_fp32'][0]:.1f}x"
            for m, r in results.items()
        )
        + " (FID at these widths: the quality benchmark)."
        + "\nTop-k (strategy.topk; error feedback always on), uplink smaller than fp32 by: "
        + "; ".join(
            f"{m} "
            + ", ".join(f"{name} {fp32_ratio(r, name):.1f}x" for name in TOPK)
            + ", with partial usplit 4-way "
            + ", ".join(f"{name} {fp32_ratio(r, f'partial usplit (4-way) + {name}'):.1f}x" for name in TOPK)
            for m, r in results.items()
        )
        + ". A top-k record holds 3 to 5 arrays whatever the model: the sent tensors' names, the kept"
        " positions (gaps as uint16 or uint32, or a bitmap of every entry when that is smaller, above"
        " about 1/16 kept), the values (float32 or codes) and, with codes, one scale per tensor."
        + "\nTarget: int8_delta downlink (steady state) >= 3.9x smaller than fp32 weights -- "
        + ("met" if met_delta else "MISSED")
        + ": "
        + ", ".join(
            f"{m} {r['ratio_downlink_int8_delta_vs_fp32']:.3f}x (int8_weights {r['ratio_int8_downlink_vs_fp32']:.3f}x;"
            f" with partial USplit 4-way {r['ratio_downlink_int8_delta_usplit4_vs_fp32']:.3f}x)"
            for m, r in results.items()
        )
        + ". `strategy.downlink` rows: round 2's message per client, arrays and config (the hashes) together; a"
        " client that missed the last round gets the fp32 weights of the view instead (the 'missed' rows),"
        " and USplit sends the whole model, so its downlink equals quant's."
        + "\nPartial exchange (strategy=partial): uplink and round-2 downlink per client, averaged over 4 clients"
        " (a node's first contact receives the whole model once). The largest uplink saving: "
        + ", ".join(f"{m} {name} {ratio:.1f}x" for m, (name, ratio) in best.items())
        + "."
        + "\nSecAgg+ (privacy=secagg, 2 clients): all four stages of a round per client. The masked update is"
        " int64 (Flower quantizes each weighted value into a 2^32 field), so the uplink is about 2x fp32: "
        + ", ".join(
            f"{m} {_uplink(r, 'SecAgg+ (4 stages, int64 masked)') / _uplink(r, 'fp32 (vanilla)'):.2f}x"
            for m, r in results.items()
        )
        + " of fp32's uplink; the downlink is the fp32 model plus the key exchange."
        + "\nFedDDPM and FedDDPM+ send what FedDM-vanilla sends every round, plus one upload of each client's"
        " local model (one fp32 model per client) before training."
        + "\nSizes are Flower's serialized objects (npy buffers, record and chunk framing). An encoded record"
        " holds four arrays whatever the model: the tensors' names, every tensor's codes concatenated (int8,"
        " or packed uint8 for 4 bits and fewer), every fp32 scale, and the bit width; the remaining gap to"
        " 4x (8x, 16x, 32x) is the scales and the names. fp32 weights travel packed as well"
        " (strategies.packing): the names, the shapes and every value in one float32 array, as the app"
        " sends them (vanilla's reply is packed because the server asks for it)."
    )
    print(write_results("wire_bytes", results, table, notes))
    print(table)
    print(notes)


if __name__ == "__main__":
    main()
