"""Every setting of FedDM, declared once: its type, default, what is allowed and what it means.

Hydra structured configs: the dataclasses below are registered in Hydra's
ConfigStore (``base_config``, the options of the ``strategy``, ``partition``,
``privacy`` and ``tracking`` groups, and the bases ``base_dataset``,
``base_model``, ... that the presets in ``conf/dataset/`` and ``conf/model/``
extend). Fields are typed ``Any`` so that OmegaConf keeps a value as given
(``strategy.quantize=yes`` stays the string) and ``validate_config`` reports
every bad value at once, with what is allowed, from each field's rule.

Derived from here: the validation (``server_app/config.py``), the README's
"Config keys" table (``python -m conf``), and the ConfigRecord the
server sends to clients and their typed settings (``CLIENT_SETTINGS``).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from models.data import SUPPORTED_DATASETS
from models.latent import AUTOENCODERS
from models.parts import PRESETS
from models.precision import MEMORY_FORMATS, PRECISIONS
from strategies.codec import GRANULARITIES, MAX_BITS, MIN_BITS
from strategies.downlink import DOWNLINK_MODES
from strategies.fedddpm import AUX_ALLOCATIONS, SIGNALS
from strategies.reply_checks import WEIGHTINGS
from strategies.sparse import TOPK_VALUES

CONF_DIR = Path(__file__).parent
DEVICES = ("auto", "cpu", "cuda")
CLIENT_STATES = ("memory", "disk")  # where clients keep their state between rounds (client_app/state.py)
# diffusers' DDPMScheduler beta schedules, and the UNet2DModel blocks that need no conditioning.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")
DOWN_BLOCKS = (
    "DownBlock2D",
    "AttnDownBlock2D",
    "ResnetDownsampleBlock2D",
    "SkipDownBlock2D",
    "AttnSkipDownBlock2D",
)
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")
CLASS_ASSIGNMENT_MODES = (
    "random",
    "deterministic",
    "first-deterministic",
)  # flwr-datasets' PathologicalPartitioner
WANDB_MODES = ("online", "offline", "disabled")


# --- Rules: each checks a value and says what is allowed (the text of the error message) ---


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def show(value: object) -> str:
    """A value as YAML writes it: null, true, 1e-4."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Anything:
    """No check of its own (a path, a name; or checked with other keys in ``server_app/config.py``)."""

    allowed: str = "anything"

    def ok(self, value: object) -> bool:
        return True


@dataclass(frozen=True)
class Int:
    min: int | None = None
    max: int | None = None
    note: str = ""

    def ok(self, value: object) -> bool:
        low = self.min is None or (is_int(value) and value >= self.min)
        return is_int(value) and low and (self.max is None or value <= self.max)

    @property
    def allowed(self) -> str:
        text = "an integer"
        if self.max is not None:
            text += f" in {self.min}..{self.max}"
        elif self.min is not None:
            text += f" >= {self.min}"
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class Number:
    """A number with bounds: ``gt``/``ge`` below, ``lt``/``le`` above."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def ok(self, value: object) -> bool:
        if not is_number(value):
            return False
        tests = (
            (self.gt, operator.gt),
            (self.ge, operator.ge),
            (self.lt, operator.lt),
            (self.le, operator.le),
        )
        return all(bound is None or test(value, bound) for bound, test in tests)

    @property
    def allowed(self) -> str:
        low = f"({self.gt}" if self.gt is not None else f"[{self.ge}" if self.ge is not None else None
        high = f"{self.lt})" if self.lt is not None else f"{self.le}]" if self.le is not None else None
        if low and high:
            return f"a number in {low}, {high}"
        if low:
            return f"a number {'>' if low[0] == '(' else '>='} {low[1:]}"
        return "a number"


@dataclass(frozen=True)
class OneOf:
    options: tuple

    def ok(self, value: object) -> bool:
        try:
            return value in self.options
        except TypeError:  # unhashable, e.g. a list
            return False

    @property
    def allowed(self) -> str:
        return " | ".join(show(o) for o in self.options)


@dataclass(frozen=True)
class Bool:
    allowed: str = "true | false"

    def ok(self, value: object) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class Exactly:
    value: object
    allowed: str

    def ok(self, value: object) -> bool:
        return type(value) is type(self.value) and value == self.value


@dataclass(frozen=True)
class AnyOf:
    rules: tuple

    def ok(self, value: object) -> bool:
        return any(rule.ok(value) for rule in self.rules)

    @property
    def allowed(self) -> str:
        return " or ".join(rule.allowed for rule in self.rules)


@dataclass(frozen=True)
class Given:
    """Set, not null or empty."""

    allowed: str

    def ok(self, value: object) -> bool:
        return value not in (None, "")


@dataclass(frozen=True)
class ExistingFile:
    allowed: str

    def ok(self, value: object) -> bool:
        return Path(str(value)).expanduser().is_file()


@dataclass(frozen=True)
class RayAddress:
    """``auto`` or ``HOST:PORT``: a running Ray cluster, as ``ray.init(address=...)`` takes it."""

    allowed: str = "auto | HOST:PORT (the head of a cluster started with `ray start --head`; port 1..65535)"

    # A host name, an IPv4 address or a bracketed IPv6 address, then the port.
    PATTERN = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):([0-9]{1,5})")

    def ok(self, value: object) -> bool:
        if value == "auto":
            return True
        match = self.PATTERN.fullmatch(value) if isinstance(value, str) else None
        return match is not None and 1 <= int(match.group(1)) <= 65535


def Optional(rule, null: str = "null") -> AnyOf:  # noqa: N802 (reads like the other rules)
    """Null (described by ``null``) or what ``rule`` allows."""
    return AnyOf((Exactly(None, null), rule))


# --- Declaring fields ---


class Client(NamedTuple):
    """A setting sent to clients in the ConfigRecord: its record key, its type (null is sent as ``type()``)."""

    key: str
    type: type


def setting(default: Any, rule, meaning: str, client: Client | None = None) -> Any:
    """A config key: ``default`` (``MISSING``: a preset sets it), its ``rule`` and one-line ``meaning``."""
    return field(default=default, metadata={"rule": rule, "meaning": meaning, "client": client})


def section(cls: type) -> Any:
    """A nested node of the schema (``scheduler``, ``eval``, ...)."""
    return field(default_factory=cls, metadata={"node": cls})


def group(name: str, choose: Callable[[Mapping], type | None], meaning: str) -> Any:
    """A config group; ``choose`` names the dataclass of the chosen option (None: an unknown one)."""
    return field(default=MISSING, metadata={"group": name, "choose": choose, "meaning": meaning})


def option(name: str) -> Any:
    """The ``name`` of a group option: which one was chosen (checked against the group's options)."""
    return field(default=name, metadata={"option": True})


# --- The schema: one dataclass per node ---


@dataclass
class Scheduler:
    """diffusers' DDPMScheduler."""

    num_train_timesteps: Any = setting(1000, Int(min=2), "DDPM diffusion steps")
    beta_schedule: Any = setting("linear", OneOf(BETA_SCHEDULES), "`DDPMScheduler` beta schedule")
    beta_start: Any = setting(
        1.0e-4, Number(gt=0, lt=1), "first beta of the schedule (DDPM paper); below beta_end"
    )
    beta_end: Any = setting(0.02, Number(gt=0, lt=1), "last beta of the schedule (DDPM paper)")


@dataclass
class Eval:
    every: Any = setting(
        1,
        Int(min=1),
        "rounds between evaluations (clients' held-out loss, sample grid, FID); the last round always gets one",
    )
    grid_size: Any = setting(16, Int(min=1), "images per sample grid")
    num_samples: Any = setting(
        0,
        AnyOf((Exactly(0, "0 (no FID)"), Int(min=2))),
        "generated images for FID and KID, against as many test images; 0 = neither",
    )
    ddim_steps: Any = setting(
        50,
        Optional(Int(min=1), "null (full DDPM)"),
        "DDIM steps for evaluation samples; null = full 1000-step DDPM",
    )
    batch_size: Any = setting(64, Int(min=1), "batch size for evaluation sampling and Inception features")
    fid_weights: Any = setting(
        None,
        Optional(ExistingFile("the path of an existing TorchScript file")),
        "path of the TorchScript FID Inception network (offline); null = torchmetrics downloads the standard one",
    )
    fid_cache: Any = setting(
        "${output_dir}/fid_cache",
        Anything("a folder"),
        "real-image FID statistics and KID features, one file per dataset, sample count and network",
    )
    seed: Any = setting(
        1234, Int(min=0), "noise seed of grids and FID samples, fixed so they compare across rounds"
    )


@dataclass
class Ema:
    enabled: Any = setting(
        True,
        Bool(),
        "keep an EMA of the global weights (diffusers `EMAModel`) for grids, FID and the saved model",
        client=Client("ema-enabled", bool),  # clients that keep parts of the model keep an EMA of their own
    )
    decay: Any = setting(
        0.9,
        Number(ge=0, lt=1),
        "per-round EMA decay; diffusers warms it up as min(decay, (1+k)/(10+k)) at EMA step k, so the first "
        "rounds weigh the newest model heavily (decays 0, 0.18, 0.25, ...)",
        client=Client("ema-decay", float),
    )


# Simulated clients that share one GPU at most when ``simulation.client_resources.num_gpus`` is null.
CLIENTS_PER_GPU = 4
_SIM = "(`feddm-run` only; see [Simulation resources](#simulation-resources-and-a-ray-cluster))"


@dataclass
class ClientResources:
    """Ray resources each simulated client reserves (Flower's backend config ``client_resources``)."""

    num_cpus: Any = setting(
        None,
        Optional(Number(gt=0), "null (automatic)"),
        f"CPUs Ray reserves for each simulated client {_SIM}; null = 2 (Flower's default), 1 when clients "
        "get a GPU share",
    )
    num_gpus: Any = setting(
        None,
        Optional(AnyOf((Number(ge=0, le=1), Int(min=1))), "null (automatic)"),
        f"GPUs Ray reserves for each simulated client {_SIM}: 0.25 lets 4 clients train on one GPU at once; "
        f"null = 0 without a CUDA GPU or with `device=cpu`, else 1/min({CLIENTS_PER_GPU}, num_clients)",
    )


@dataclass
class Simulation:
    """``feddm-run``'s in-process simulation: Flower's Ray backend."""

    client_resources: Any = section(ClientResources)
    ray_address: Any = setting(
        None,
        Optional(RayAddress(), "null (Ray's default)"),
        f"the Ray cluster simulated clients run on {_SIM}: `HOST:PORT` of its head (`auto`: the one started on "
        "this machine); null = Ray's default, a new local instance unless `RAY_ADDRESS` is set or `ray start` "
        "runs here",
    )


@dataclass
class Dataset:
    """Base of the presets in ``conf/dataset/``."""

    name: Any = setting(
        MISSING, OneOf(SUPPORTED_DATASETS), "torchvision's datasets or `image_folder` (local files)"
    )
    root: Any = setting(
        MISSING,
        Anything("a folder"),
        "folder holding the dataset in torchvision's layout (relative paths are made absolute against the "
        "directory the run is started from)",
    )
    download: Any = setting(
        "auto",
        OneOf(("auto", True, False)),
        "`auto`: use the files under `dataset.root` when they are there, else download them there with "
        "torchvision (one process at a time); `true`: always let torchvision check and download; `false`: never "
        "download (`image_folder`: false or auto)",
    )
    image_size: Any = setting(
        MISSING, Int(min=1), "image height and width in pixels (images are resized to it)"
    )
    channels: Any = setting(MISSING, Int(min=1), "image channels: 1 (grayscale) or 3 (RGB)")
    classes: Any = setting(
        None,
        Anything("null or a list of labels"),
        "keep only the images with these labels, in both splits (so the clients' data, their partitions and "
        "FID's reference), e.g. `[5,6,7,8,9]`; null = all",
    )


@dataclass
class CelebADataset(Dataset):
    label_attribute: Any = setting(
        "Male", Anything("a CelebA attribute"), "the attribute non-IID partitions split by"
    )


# The model presets (conf/model/) extend base_model or, for latent diffusion, base_latent_model.
_MODEL = {
    "name": (MISSING, Anything("a name"), "the model size (set by the model group)"),
    "lr": (
        MISSING,
        Number(gt=0),
        "the learning rate that trains this size (see [Learning rates](#learning-rates-and-divergence))",
    ),
    "unet": (
        MISSING,
        Anything("checked in server_app/config.py"),
        "keyword arguments of `diffusers.UNet2DModel`",
    ),
    "pretrained": (
        None,
        Optional(Given("a diffusers pipeline folder or hub id")),
        "a diffusers pipeline (folder with `unet/` and `scheduler/`, e.g. a FedDM run's `model/`; online a hub "
        "id) whose UNet and scheduler start the run: the UNet's config comes from it, not `model.unet`; with "
        "`adapter=lora` every node needs it (a SuperNode's node config `pretrained` wins); null = train from "
        "scratch",
    ),
}


@dataclass
class Model:
    name: Any = setting(*_MODEL["name"])
    lr: Any = setting(*_MODEL["lr"])
    unet: Any = setting(*_MODEL["unet"])
    pretrained: Any = setting(*_MODEL["pretrained"])


@dataclass
class Autoencoder:
    path: Any = setting(
        None,
        Given("the diffusers folder (or, online, hub id) of the frozen autoencoder"),
        "diffusers folder (online: hub id) of the frozen `AutoencoderKL`/`VQModel`; a SuperNode may set its own "
        "with node config `autoencoder-path`",
    )
    kind: Any = setting("kl", OneOf(tuple(AUTOENCODERS)), "`kl` (AutoencoderKL) or `vq` (VQModel)")
    subfolder: Any = setting(None, Anything("a folder"), "the subfolder of `path` holding it (e.g. `vae`)")
    scaling_factor: Any = setting(
        None,
        Optional(Number(gt=0), "null (the autoencoder's own)"),
        "latents are `scaling_factor · z`; null = the autoencoder's own (a new autoencoder needs 1/std of its z; "
        "clients warn and name the value)",
    )


@dataclass
class LatentModel:
    """Latent diffusion (``model=ldm``): the UNet works on the latents of a frozen autoencoder."""

    name: Any = setting(*_MODEL["name"])
    lr: Any = setting(*_MODEL["lr"])
    autoencoder: Any = section(Autoencoder)
    unet: Any = setting(*_MODEL["unet"])
    pretrained: Any = setting(*_MODEL["pretrained"])


# Strategies (``strategy=...``); quant and partial share the codec's settings.
_CODEC = {
    "bits": (
        8,
        Int(min=MIN_BITS, max=MAX_BITS),
        "bits per value of the update codes: 5-8 travel as int8, 4 and 3 two per byte, 2 four per byte, 1 (the "
        "sign, with a scale) eight per byte",
    ),
    "granularity": (
        "channel",
        OneOf(GRANULARITIES),
        "`channel` (one fp32 scale per output channel; 1-D tensors per tensor) or `tensor`",
    ),
    "stochastic_rounding": (False, Bool(), "unbiased stochastic rounding instead of nearest"),
    "error_feedback": (
        False,
        Bool(),
        "each client adds last round's quantization residual (kept in `Context.state`); always on with "
        "`strategy.topk`",
    ),
    "topk": (
        0.0,
        Number(ge=0, lt=1),
        "top-k sparsification: 0 = off; else the fraction of each tensor's update entries sent, the largest "
        "(at least one), as positions and values; implies error feedback, so what is not sent goes in a later "
        "round (`partial`: needs `strategy.quantize=true`)",
    ),
    "topk_values": (
        "quantized",
        OneOf(TOPK_VALUES),
        "with `strategy.topk`: the kept values as `strategy.bits`-bit codes with one scale per tensor "
        "(`quantized`) or as `float32`",
    ),
}
# Every strategy's: the form the global model travels to the clients in (strategies/downlink.py).
_DOWNLINK = (
    "weights",
    OneOf(DOWNLINK_MODES),
    "what the clients receive (see [Downlink](#downlink-strategydownlink)): `weights` (fp32), `int8_weights` "
    "(8-bit codes per output channel) or `int8_delta` (8-bit codes of the change since what the client was "
    "sent when it last trained, kept on both sides; full fp32 weights to a client that missed the last round)",
)


@dataclass
class Vanilla:
    """FedDM-vanilla: FedAvg of full weights, weighted by num-examples."""

    name: Any = option("vanilla")
    downlink: Any = setting(*_DOWNLINK)


@dataclass
class Prox:
    """FedDM-prox: clients add (mu/2)·||w - w_global||^2 to the loss."""

    name: Any = option("prox")
    downlink: Any = setting(*_DOWNLINK)
    mu: Any = setting(0.01, Number(ge=0), "proximal weight mu (0 trains exactly as vanilla)")


@dataclass
class Quant:
    """FedDM-quant: clients send int8 codes of their update."""

    name: Any = option("quant")
    downlink: Any = setting(*_DOWNLINK)
    bits: Any = setting(*_CODEC["bits"])
    granularity: Any = setting(*_CODEC["granularity"])
    stochastic_rounding: Any = setting(*_CODEC["stochastic_rounding"])
    error_feedback: Any = setting(*_CODEC["error_feedback"])
    topk: Any = setting(*_CODEC["topk"])
    topk_values: Any = setting(*_CODEC["topk_values"])


@dataclass
class Partial:
    """Partial-UNet exchange (FedDiffuse): only some parts of the UNet are federated."""

    name: Any = option("partial")
    downlink: Any = setting(*_DOWNLINK)
    preset: Any = setting(
        "udec",
        OneOf((*PRESETS, "custom")),
        "the federated parts (see [Partial-UNet exchange](#partial-unet-exchange-strategypartial))",
    )
    shared: Any = setting(
        None,
        Anything("checked with the UNet in server_app/config.py"),
        "`custom` preset only: the federated parts, e.g. `[mid_block,up_blocks,head]`",
    )
    split_ways: Any = setting(
        2,
        Int(min=2),
        "`usplit` only: clients per group that send one model between them (2 = the paper's pairs)",
    )
    quantize: Any = setting(
        False,
        Bool(),
        "send int8 codes of the update of what is sent (the codec of `quant`; with `strategy.topk`, its "
        "largest entries)",
    )
    bits: Any = setting(*_CODEC["bits"])
    granularity: Any = setting(*_CODEC["granularity"])
    stochastic_rounding: Any = setting(*_CODEC["stochastic_rounding"])
    error_feedback: Any = setting(*_CODEC["error_feedback"])
    topk: Any = setting(*_CODEC["topk"])
    topk_values: Any = setting(*_CODEC["topk_values"])


@dataclass
class FedDDPM:
    """FedDDPM: FedAvg + server calibration on images sampled from the clients' own models."""

    name: Any = option("fedddpm")
    downlink: Any = setting(*_DOWNLINK)
    pretrain_steps: Any = setting(
        200, Int(min=1), "steps each client trains its own model before federated training; uploaded once"
    )
    aux_samples: Any = setting(
        512, Int(min=1), "auxiliary images the server samples from the clients' models (>= num_clients)"
    )
    aux_allocation: Any = setting(
        "balanced",
        OneOf(AUX_ALLOCATIONS),
        "`balanced` (as many from each client's model) or `weighted` (by example counts)",
    )
    aux_ddim_steps: Any = setting(
        50, Optional(Int(min=1), "null (full DDPM)"), "DDIM steps for the auxiliary images (null = full DDPM)"
    )
    calibration_steps: Any = setting(
        20, Int(min=1), "server fine-tuning steps on the auxiliary images per round"
    )
    calibration_lr: Any = setting(1.0e-4, Number(gt=0), "AdamW learning rate of the calibration")
    calibration_batch_size: Any = setting(32, Int(min=1), "batch size of the calibration")


@dataclass
class FedDDPMPlus(FedDDPM):
    """FedDDPM+: like FedDDPM, but calibrates only when progress stalls, once per stall."""

    name: Any = option("fedddpm_plus")
    signal: Any = setting("eval_loss", OneOf(SIGNALS), "progress signal (`fid` needs eval.num_samples > 0)")
    window: Any = setting(2, Int(min=1), "observations of the signal over which progress is measured")
    threshold: Any = setting(
        0.02,
        Number(ge=0),
        "calibrate once when the relative improvement over `window` observations is below this",
    )


# Partitions (``partition=...``): flwr-datasets partitioners, by label.
@dataclass
class Iid:
    name: Any = option("iid")


@dataclass
class Dirichlet:
    name: Any = option("dirichlet")
    alpha: Any = setting(0.5, Number(gt=0), "concentration; smaller is more skewed")
    min_partition_size: Any = setting(10, Int(min=0), "resample until each client has this many images")
    self_balancing: Any = setting(False, Bool(), "flwr-datasets' self balancing")


@dataclass
class Pathological:
    name: Any = option("pathological")
    classes_per_client: Any = setting(2, Int(min=1), "classes on each client (1 .. number of classes)")
    class_assignment_mode: Any = setting(
        "first-deterministic", OneOf(CLASS_ASSIGNMENT_MODES), "how classes are assigned to clients"
    )


# Privacy (``privacy=...``): central DP with fixed clipping, or Flower's SecAgg+.
@dataclass
class NoPrivacy:
    name: Any = option("none")


@dataclass
class DPServer:
    """Central DP, server-side fixed clipping (Flower's DP functions)."""

    name: Any = option("dp_server")
    clipping_norm: Any = setting(
        1.0, Number(gt=0), "L2 norm each client's update w_local − w_global is clipped to"
    )
    noise_multiplier: Any = setting(
        0.1,
        Number(ge=0),
        "Gaussian noise of std noise_multiplier · clipping_norm / k on the mean of k updates",
    )
    delta: Any = setting(
        1e-5,
        Number(gt=0, lt=1),
        "δ at which `epsilon` (client-level, Flower's RdpAccountant) is written to metrics.jsonl each round",
    )
    max_epsilon: Any = setting(
        None,
        Optional(Number(gt=0), "null (no limit)"),
        "the run stops, checkpoint and model saved, before a round would take `epsilon` above this; needs "
        "`weighting=uniform` and `max_update_norm_ratio=null` (see [Privacy](#privacy))",
    )


@dataclass
class DPClient(DPServer):
    """Central DP, client-side fixed clipping (Flower's fixedclipping_mod)."""

    name: Any = option("dp_client")


@dataclass
class SecAgg:
    """Secure aggregation: Flower's SecAgg+ protocol (see the README's Privacy section)."""

    name: Any = option("secagg")
    num_shares: Any = setting(
        1.0,
        Anything("checked with the clients in server_app/config.py"),
        "nodes each node's secrets are shared with; a fraction in (0, 1] of the round's nodes, or an odd count >= 3",
    )
    reconstruction_threshold: Any = setting(
        0.67,
        Anything("checked with the clients in server_app/config.py"),
        "shares needed to unmask; a fraction in (0, 1] of `num_shares` (at least 2), or a count >= 2",
    )
    clipping_range: Any = setting(
        0.1,
        Number(gt=0),
        "each value of a client's update times num-examples / `max_weight` must lie within ± this",
    )
    max_weight: Any = setting(
        1000000,
        Number(ge=1),
        "the largest `num-examples` a client may report (see [Privacy](#privacy) for the quantization step)",
    )


# Adapters (``adapter=...``): what of the UNet is trained and exchanged (``models/adapters.py``).
@dataclass
class NoAdapter:
    """The whole UNet is trained and exchanged."""

    name: Any = option("none")


@dataclass
class LoraAdapter:
    """LoRA on a pretrained UNet (``model.pretrained``): only the adapters train and travel."""

    name: Any = option("lora")
    rank: Any = setting(4, Int(min=1), "r: adapters B (out x r) and A (r x in) per targeted layer")
    alpha: Any = setting(
        None, Optional(Number(gt=0), "null (= rank)"), "the adapters' scale is alpha / rank; null = rank (1)"
    )
    target_modules: Any = setting(
        ("to_q", "to_k", "to_v", "to_out.0"),
        Anything("module names or name suffixes, checked against the UNet"),
        "the layers that get adapters (peft's name matching): the attention projections by default; add "
        "`conv1`, `conv2` for the ResNet convolutions",
    )


# Tracking (``tracking=...``): sinks besides metrics.jsonl and the sample grids, which are always written.
@dataclass
class NoTracking:
    name: Any = option("none")


@dataclass
class TensorBoard:
    name: Any = option("tensorboard")


@dataclass
class WandB:
    name: Any = option("wandb")
    project: Any = setting("feddm", Anything("a name"), "the W&B project")
    entity: Any = setting(
        None, Anything("a name"), "the W&B user or team; null = the account's default entity"
    )
    mode: Any = setting(
        "offline",
        OneOf(WANDB_MODES),
        "`online` logs live; `offline` needs no account or network (upload later with `wandb sync`); `disabled`",
    )


# Aggregators (``aggregator=...``): Flower's strategy classes (``strategies/aggregators.py``); each
# key but ``name`` is a constructor argument of the class, under the same name.
_SERVER_LR = "server learning rate: the step along the mean update (pseudo-gradient) per round"
_ADAPTIVE = {
    "eta": (1.0e-3, Number(gt=0), _SERVER_LR),
    "beta_1": (0.9, Number(ge=0, lt=1), "decay of the first moment (momentum) of the mean update"),
    "beta_2": (0.99, Number(ge=0, lt=1), "decay of the second moment of the mean update"),
    "tau": (1.0e-3, Number(gt=0), "adaptivity: added to the root of the second moment"),
}
_BYZANTINE = (
    0,
    Int(min=0),
    "replies assumed malicious (f); the rounds need >= 2f + 3 replies (Bulyan: 4f + 3)",
)


@dataclass
class FedAvgAggregator:
    """FedAvg: the example-weighted mean."""

    name: Any = option("fedavg")


@dataclass
class FedAvgMAggregator:
    """FedAvgM (Hsu et al. 2019): server momentum on the mean update."""

    name: Any = option("fedavgm")
    server_learning_rate: Any = setting(1.0, Number(gt=0), _SERVER_LR)
    server_momentum: Any = setting(0.9, Number(ge=0, lt=1), "server momentum (0: plain server SGD)")


@dataclass
class FedAdamAggregator:
    """FedAdam (Reddi et al., ICLR 2021): Adam on the mean update."""

    name: Any = option("fedadam")
    eta: Any = setting(*_ADAPTIVE["eta"])
    beta_1: Any = setting(*_ADAPTIVE["beta_1"])
    beta_2: Any = setting(*_ADAPTIVE["beta_2"])
    tau: Any = setting(*_ADAPTIVE["tau"])


@dataclass
class FedYogiAggregator(FedAdamAggregator):
    """FedYogi (Reddi et al., ICLR 2021): Yogi on the mean update."""

    name: Any = option("fedyogi")


@dataclass
class FedAdagradAggregator:
    """FedAdagrad (Reddi et al., ICLR 2021): Adagrad on the mean update."""

    name: Any = option("fedadagrad")
    eta: Any = setting(*_ADAPTIVE["eta"])
    tau: Any = setting(*_ADAPTIVE["tau"])


@dataclass
class MedianAggregator:
    """Coordinate-wise median of the replies (Yin et al. 2018)."""

    name: Any = option("median")


@dataclass
class TrimmedMeanAggregator:
    """Coordinate-wise trimmed mean (Yin et al. 2018)."""

    name: Any = option("trimmed_mean")
    beta: Any = setting(0.2, Number(ge=0, lt=0.5), "fraction cut from each end of every coordinate's values")


@dataclass
class KrumAggregator:
    """Krum (Blanchard et al. 2017): the reply closest to its n - f - 2 nearest others."""

    name: Any = option("krum")
    num_malicious_nodes: Any = setting(*_BYZANTINE)


@dataclass
class MultiKrumAggregator(KrumAggregator):
    """Multi-Krum: the mean of the m replies with the best Krum scores."""

    name: Any = option("multikrum")
    num_nodes_to_select: Any = setting(1, Int(min=1), "replies averaged (m; at most the round's replies)")


@dataclass
class BulyanAggregator(KrumAggregator):
    """Bulyan (El Mhamdi et al. 2018): Multi-Krum selection, then a trimmed mean around the median."""

    name: Any = option("bulyan")


def _options(*classes: type) -> dict[str, type]:
    return {cls.name: cls for cls in classes}


STRATEGIES = _options(Vanilla, Prox, Quant, Partial, FedDDPM, FedDDPMPlus)
PARTITIONS = _options(Iid, Dirichlet, Pathological)
PRIVACY = _options(NoPrivacy, DPServer, DPClient, SecAgg)
TRACKING = _options(NoTracking, TensorBoard, WandB)
ADAPTERS = _options(NoAdapter, LoraAdapter)
AGGREGATOR_OPTIONS = _options(
    FedAvgAggregator,
    FedAvgMAggregator,
    FedAdamAggregator,
    FedYogiAggregator,
    FedAdagradAggregator,
    MedianAggregator,
    TrimmedMeanAggregator,
    KrumAggregator,
    MultiKrumAggregator,
    BulyanAggregator,
)
OPTIONS = {
    "strategy": STRATEGIES,
    "aggregator": AGGREGATOR_OPTIONS,
    "partition": PARTITIONS,
    "privacy": PRIVACY,
    "tracking": TRACKING,
    "adapter": ADAPTERS,
}
# The presets' schema bases (Hydra's "extending configs": ``defaults: [base_model, _self_]``).
BASES = {
    "dataset": {"base_dataset": Dataset, "base_celeba": CelebADataset},
    "model": {"base_model": Model, "base_latent_model": LatentModel},
}


def _option_of(group_name: str) -> Callable[[Mapping], type | None]:
    return lambda node: OPTIONS[group_name].get(node.get("name"))


@dataclass
class Config:
    """The run: ``conf/config.yaml`` picks one option of each group; these are the run's own keys."""

    dataset: Any = group(
        "dataset",
        lambda node: CelebADataset if node.get("name") == "celeba" else Dataset,
        "data source, image size and channels",
    )
    model: Any = group("model", lambda node: LatentModel if "autoencoder" in node else Model, "the UNet")
    strategy: Any = group("strategy", _option_of("strategy"), "the strategy")
    aggregator: Any = group(
        "aggregator", _option_of("aggregator"), "the Flower strategy class that aggregates the replies"
    )
    partition: Any = group("partition", _option_of("partition"), "the partitioner")
    privacy: Any = group("privacy", _option_of("privacy"), "central DP or secure aggregation")
    tracking: Any = group(
        "tracking", _option_of("tracking"), "where metrics and grids go besides the run folder"
    )
    adapter: Any = group("adapter", _option_of("adapter"), "what of the UNet trains and travels")
    num_rounds: Any = setting(3, Int(min=1), "federated rounds")
    num_clients: Any = setting(
        2,
        Int(min=1),
        "clients that must be connected before training starts (the population); `clients_per_round` of them "
        "train each round",
    )
    min_clients: Any = setting(
        None,
        Optional(Int(min=1)),
        "fewest connected clients a round may run with (after a SuperNode fails); null = `num_clients`",
    )
    clients_per_round: Any = setting(
        None,
        Optional(Int(min=1), "null (every connected client)"),
        "clients drawn to train each round (at most `min_clients`), the same for the same `seed` and round, "
        "also after a resume; null = every connected client",
    )
    eval_clients_per_round: Any = setting(
        None,
        Optional(Int(min=1), "null (as `clients_per_round`)"),
        "clients drawn to evaluate at evaluation rounds (at most `min_clients`), drawn apart from the trainers; "
        "null = as many as `clients_per_round`",
    )
    over_select: Any = setting(
        0,
        Number(ge=0),
        "extra share of clients drawn to train: ceil(`clients_per_round` x (1 + over_select)), at most "
        "`min_clients`, so that `clients_per_round` replies still arrive by `round_timeout_s` when some are "
        "late; every reply in time is aggregated; needs `clients_per_round`",
    )
    min_replies: Any = setting(
        None,
        Optional(Int(min=1), "null (1)"),
        "fewest training replies a round aggregates (at most `clients_per_round`, else `min_clients`); with "
        "fewer (late, failed or left out) the run stops with the last good round; null = 1",
    )
    client_state: Any = setting(
        "memory",
        OneOf(CLIENT_STATES),
        "where each client keeps what it carries between rounds (quant's error-feedback residual, partial "
        "exchange's local parts and own EMA; about one model copy each): `memory` (Flower's `Context.state`) or "
        "`disk` (safetensors files per client, loaded when it is sampled; for many clients or large models, and kept "
        "across a resume or a SuperNode restart)",
        client=Client("client-state", str),
    )
    client_state_dir: Any = setting(
        None,
        Optional(Anything("a folder"), "null (automatic)"),
        "with `client_state=disk`: the folder of the clients' state files (a SuperNode's node config "
        "`client-state-dir` wins); null = the run folder's `client_state/` in simulation (removed when the run "
        "finishes), `~/.cache/feddm/client_state` on a SuperNode",
        client=Client("client-state-dir", str),
    )
    local_steps: Any = setting(
        50,
        Int(min=1),
        "optimizer steps per client per round (when `local_epochs` is null)",
        client=Client("local-steps", int),
    )
    local_epochs: Any = setting(
        None,
        Optional(Int(min=1)),
        "if set, passes over the client's training split per round instead of `local_steps`",
        client=Client("local-epochs", int),  # null is sent as 0
    )
    lr: Any = setting(
        "${model.lr}",
        Number(gt=0),
        "AdamW learning rate on the clients; follows the model group unless set (`lr=5e-4` wins)",
        client=Client("lr", float),
    )
    weight_decay: Any = setting(0.0, Number(ge=0), "AdamW weight decay", client=Client("weight-decay", float))
    batch_size: Any = setting(32, Int(min=1), "client mini-batch size", client=Client("batch-size", int))
    max_grad_norm: Any = setting(
        1.0,
        Number(ge=0),
        "gradient clipping (global L2 norm; 0 turns it off)",
        client=Client("max-grad-norm", float),
    )
    seed: Any = setting(
        0, Int(min=0), "seeds the initial model, partitions, data order and noise", client=Client("seed", int)
    )
    device: Any = setting(
        "auto",
        OneOf(DEVICES),
        "`auto` (CUDA if present), `cpu` or `cuda`, for server and clients; a SuperNode's node config `device` wins",
        client=Client("device", str),
    )
    precision: Any = setting(
        "auto",
        OneOf(PRECISIONS),
        "forward passes of client training, evaluation, server calibration and sampling: `fp32`, `bf16` "
        "(`torch.autocast`) or `fp16` (autocast and a gradient scaler; CUDA only); weights, updates and the wire "
        "stay fp32; `auto` = bf16 on a GPU that supports it, fp32 on a CPU; a SuperNode's node config "
        "`precision` wins",
        client=Client("precision", str),
    )
    compile: Any = setting(
        False,
        Bool(),
        "`torch.compile` the UNet for client training (compiles once per ClientApp process: pays off for long "
        "local rounds on a GPU, costs tens of seconds on a CPU)",
        client=Client("compile", bool),
    )
    memory_format: Any = setting(
        "auto",
        OneOf(MEMORY_FORMATS),
        "layout of the UNet and the batches in client training: `channels_last`, `contiguous`, or `auto` = "
        "channels-last on a GPU, contiguous on a CPU; the weights travel contiguous either way",
        client=Client("memory-format", str),
    )
    dataloader_workers: Any = setting(
        0,
        Int(min=0),
        "DataLoader worker processes per client for local training (0: load in the training process; raise it "
        "on GPU nodes whose images are decoded from files, e.g. CelebA); a SuperNode's node config "
        "`dataloader-workers` wins",
        client=Client("dataloader-workers", int),
    )
    round_timeout_s: Any = setting(
        3600,
        Number(gt=0),
        "the round's deadline: seconds the server waits for a round's replies (each of SecAgg+'s stages, "
        "evaluation); later replies are discarded and counted in `num_late`",
    )
    node_wait_timeout_s: Any = setting(
        120,
        Number(gt=0),
        "seconds the server waits for `num_clients` nodes to connect before it stops with an error",
    )
    reply_poll_s: Any = setting(
        0.2,
        Number(gt=0),
        "seconds between the server's looks for replies on the Deployment Engine (Flower's own grid waits "
        "3 s; the simulation grid polls every 0.1 s and ignores this)",
    )
    client_eval_fraction: Any = setting(
        0.1,
        Number(gt=0, lt=1),
        "share of each client's partition held out for its evaluate handler",
        client=Client("eval-fraction", float),
    )
    client_eval_max_examples: Any = setting(
        256,
        Int(min=1),
        "at most this many held-out images per client evaluation",
        client=Client("eval-max-examples", int),
    )
    weighting: Any = setting(
        "examples",
        OneOf(WEIGHTINGS),
        "how replies weigh in the mean: `examples` (by their `num-examples`, FedAvg) or `uniform` (each accepted "
        "reply's `num-examples` is set to 1 before averaging: a client cannot weigh more by claiming more; "
        "FedDDPM's `weighted` allocation becomes balanced)",
    )
    max_num_examples: Any = setting(
        None,
        Optional(Int(min=1), "null (in simulation the largest partition, else 10^9)"),
        "the largest `num-examples` a reply may claim (more: left out, logged); null = in simulation the size of "
        "the largest partition, computed by the server from the dataset and partitioner, in a deployment 10^9 "
        "(the server cannot know the nodes' data: set it)",
    )
    max_update_norm_ratio: Any = setting(
        10.0,
        Optional(Number(gt=1), "null (no check)"),
        "a training reply whose update w_client − w_global (RMS per value) is more than this times the median "
        "of the round's replies is left out, once 3 or more replies came in; null = no check",
    )
    scheduler: Any = section(Scheduler)
    eval: Any = section(Eval)
    ema: Any = section(Ema)
    simulation: Any = section(Simulation)
    checkpoint_every: Any = setting(
        1, Int(min=0, note="0: no checkpoints"), "rounds between checkpoints in the run folder; 0 = none"
    )
    resume: Any = setting(
        None, Anything("a run folder"), "`feddm-run resume=RUN_DIR` continues that run from its checkpoint"
    )
    output_dir: Any = setting("outputs", Anything("a folder"), "parent folder of new run folders")
    run_dir: Any = setting(
        "",
        Anything("a folder"),
        "the run folder; empty = `<output_dir>/<date>_<time>_<strategy>` (`feddm-run` uses Hydra's output directory)",
    )
    superlink: Any = setting(
        None,
        Anything("a connection name"),
        "`feddm-run` only: null simulates in-process; a connection name from `$FLWR_HOME/config.toml` submits "
        "with `flwr run`",
    )


def register() -> None:
    """Store the schema in Hydra's ConfigStore (before ``compose`` or ``@hydra.main``)."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for group_name, options in (*OPTIONS.items(), *BASES.items()):
        for name, cls in options.items():
            store.store(group=group_name, name=name, node=cls)


register()


def group_options(group_name: str) -> tuple[str, ...]:
    """The options a user can choose in a group: its schema options and the YAML presets in ``conf/<group>/``."""
    presets = {p.stem for p in (CONF_DIR / group_name).glob("*.yaml")}
    return tuple(sorted(presets | set(OPTIONS.get(group_name, {}))))


# --- Validation: every field's rule ---


def not_allowed(key: str, value: object, allowed: str) -> str:
    """The message of a bad value (one line of ``ConfigError``)."""
    return f"{key}={value!r} is not allowed: {allowed}"


def problems(cfg: Mapping, cls: type = Config, prefix: str = "") -> list[str]:
    """Each value of ``cfg`` that its field's rule does not allow (keys ``cfg`` lacks are not checked)."""
    errors: list[str] = []
    for f in fields(cls):
        key = prefix + f.name
        if f.name not in cfg.keys() or f.metadata.get("option"):
            continue
        if OmegaConf.is_missing(cfg, f.name):
            errors.append(not_allowed(key, MISSING, f.metadata["rule"].allowed + " (a preset must set it)"))
            continue
        value = cfg[f.name]
        if "node" in f.metadata and value is not None:
            errors += problems(value, f.metadata["node"], key + ".")
        elif "group" in f.metadata and value is not None:
            errors += _group_problems(value, f.metadata, key)
        elif "rule" in f.metadata and not f.metadata["rule"].ok(value):
            errors.append(not_allowed(key, value, f.metadata["rule"].allowed))
    return errors


def _group_problems(node: Mapping, meta: Mapping, key: str) -> list[str]:
    cls = meta["choose"](node)
    if cls is None:  # an option group's unknown name
        return [not_allowed(f"{key}.name", node.get("name"), " | ".join(group_options(meta["group"])))]
    return problems(node, cls, key + ".")


# --- The ConfigRecord sent to clients ---


class ClientSetting(NamedTuple):
    key: str  # the ConfigRecord's key, e.g. local-steps
    attr: str  # the client's ClientSettings attribute, e.g. local_steps
    type: type
    path: str  # the config key, e.g. local_steps


def _client_settings(cls: type = Config, prefix: str = "") -> Iterator[ClientSetting]:
    for f in fields(cls):
        if "node" in f.metadata:
            yield from _client_settings(f.metadata["node"], f"{prefix}{f.name}.")
        elif f.metadata.get("client"):
            client = f.metadata["client"]
            yield ClientSetting(client.key, client.key.replace("-", "_"), client.type, prefix + f.name)


# The typed settings clients get (the fields declared with client=...), and those sent as JSON.
CLIENT_SETTINGS = tuple(_client_settings())
CLIENT_JSON_KEYS = ("unet", "autoencoder", "scheduler", "dataset", "partition")


def client_values(cfg: Mapping) -> dict[str, Any]:
    """The typed client settings of ``cfg`` by record key; a null is sent as ``type()`` (0, 0.0, "")."""
    values = {}
    for s in CLIENT_SETTINGS:
        value = OmegaConf.select(cfg, s.path)
        values[s.key] = s.type() if value is None else s.type(value)
    return values


# --- The README's "Config keys" table ---


def _cell(value: object) -> str:
    if value == "":
        return '`""`'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, str) and "${" in value:
        return f"`{value}`"
    return show(value).replace("|", "\\|")


def _default_options() -> dict[str, str]:
    """The option ``conf/config.yaml`` picks in each group."""
    entries = OmegaConf.load(CONF_DIR / "config.yaml").defaults
    return {k: v for entry in entries if isinstance(entry, Mapping) for k, v in entry.items() if " " not in k}


def _presets(group_name: str) -> dict[str, Any]:
    return {p.stem: OmegaConf.load(p) for p in sorted((CONF_DIR / group_name).glob("*.yaml"))}


def _members(group_name: str) -> dict[str, type]:
    """Each option of a group and its dataclass (a preset: the schema base its defaults list names)."""
    if group_name in OPTIONS:
        return dict(OPTIONS[group_name])
    bases = BASES[group_name]
    return {
        o: bases[next(b for b in node.defaults if b in bases)] for o, node in _presets(group_name).items()
    }


def _preset_default(group_name: str, name: str, default_option: str) -> str:
    """A key the presets set: the default option's value, then the others' where they differ."""
    values = {option: node.get(name) for option, node in _presets(group_name).items() if name in node}
    first = values.pop(default_option, None)
    if isinstance(first, Mapping):
        return f"see `conf/{group_name}/`"
    others = ", ".join(f"{option} {_cell(v)}" for option, v in values.items() if v != first)
    return _cell(first) + (f" ({others})" if others and name != "name" else "")


def _rows(cls: type, prefix: str, group_name: str = "", default_option: str = "") -> Iterator[tuple]:
    """(key, default, meaning) of each setting of ``cls`` and its sections."""
    for f in fields(cls):
        if "node" in f.metadata:
            yield from _rows(f.metadata["node"], f"{prefix}{f.name}.")
        elif "rule" in f.metadata:
            if f.default == MISSING:  # a preset sets it
                default = _preset_default(group_name, f.name, default_option)
            else:
                default = _cell(f.default)
            yield prefix + f.name, default, f.metadata["meaning"]


def _group_rows(group_name: str, meaning: str, default_option: str) -> Iterator[tuple]:
    """The group's keys; those not every option has name the options that have them."""
    members = _members(group_name)
    if group_name in OPTIONS:
        choices = ", ".join(f"`{o}`" for o in members)
        yield f"{group_name}.name", default_option, f"{meaning}: {choices} (set by the `{group_name}` group)"
    seen = {f"{group_name}.name"} if group_name in OPTIONS else set()
    for cls in dict.fromkeys(members.values()):
        for key, default, text in _rows(cls, f"{group_name}.", group_name, default_option):
            if key not in seen:
                seen.add(key)
                top = key.split(".")[1]
                holders = [o for o, c in members.items() if top in c.__dataclass_fields__]
                label = "" if len(holders) == len(members) else ", ".join(f"`{h}`" for h in holders) + ": "
                yield key, default, label + text


def markdown_table() -> str:
    """The README's "Config keys" table: the run's keys, then each group's."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    defaults = _default_options()
    rows = list(_rows(Config, ""))  # the run's keys and sections (groups have neither rule nor node)
    for f in fields(Config):
        if "group" in f.metadata:
            rows += _group_rows(f.name, f.metadata["meaning"], defaults[f.name])
    lines += [f"| `{key}` | {default} | {meaning} |" for key, default, meaning in rows]
    return "\n".join(lines) + "\n"
