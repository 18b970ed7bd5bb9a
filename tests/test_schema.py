"""conf/schema.py: one declaration per setting, from which validation, the README and the ConfigRecord derive."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import conf.schema as schema
from client_app.partition import PARTITION_SCHEMES
from client_app.task import _JSON_KEYS, _TYPED_KEYS, ClientSettings, read_settings
from models.data import SUPPORTED_DATASETS
from models.latent import AUTOENCODERS
from models.parts import PRESETS
from server_app.config import ConfigError, compose_config, group_options, validate_config
from strategies.codec import GRANULARITIES, MAX_BITS, MIN_BITS
from strategies.fedddpm import AUX_ALLOCATIONS, SIGNALS

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(
    ("rule", "good", "bad", "allowed"),
    [
        (schema.Int(min=1), [1, 7], [0, 1.5, True, "3", None], "an integer >= 1"),
        (schema.Int(min=2, max=8), [2, 8], [1, 9], "an integer in 2..8"),
        (schema.Int(min=0, note="0: none"), [0], [-1], "an integer >= 0 (0: none)"),
        (schema.Number(gt=0), [1e-4, 3], [0, -1, False, "1"], "a number > 0"),
        (schema.Number(ge=0), [0, 0.5], [-0.1], "a number >= 0"),
        (schema.Number(gt=0, lt=1), [0.1], [0, 1, 1.0], "a number in (0, 1)"),
        (schema.Number(ge=0, lt=1), [0, 0.9], [1, -0.1], "a number in [0, 1)"),
        (schema.OneOf(("auto", True, False)), ["auto", True], ["yes", None, [1]], "auto | true | false"),
        (schema.Bool(), [True, False], ["yes", 1, None], "true | false"),
        (schema.Optional(schema.Int(min=1)), [None, 3], [0, "x"], "null or an integer >= 1"),
        (
            schema.AnyOf((schema.Exactly(0, "0 (off)"), schema.Int(min=2))),
            [0, 2],
            [1, 0.0, False],
            "0 (off) or an integer >= 2",
        ),
        (schema.Given("a path"), ["x"], [None, ""], "a path"),
    ],
)
def test_each_rule_checks_and_says_what_is_allowed(rule, good, bad, allowed):
    assert all(rule.ok(v) for v in good) and not any(rule.ok(v) for v in bad)
    assert rule.allowed == allowed


def _settings(cls):
    """Every field of the schema's dataclasses (and their sections)."""
    for f in dataclasses.fields(cls):
        yield cls, f
        if "node" in f.metadata:
            yield from _settings(f.metadata["node"])


ALL_CLASSES = [
    schema.Config,
    *schema.STRATEGIES.values(),
    *schema.PARTITIONS.values(),
    *schema.PRIVACY.values(),
    *schema.TRACKING.values(),
    *(cls for bases in schema.BASES.values() for cls in bases.values()),
]


def test_every_setting_has_a_rule_and_a_one_line_meaning():
    for cls in ALL_CLASSES:
        for owner, f in _settings(cls):
            if "rule" in f.metadata:
                meaning = f.metadata["meaning"]
                assert meaning and "\n" not in meaning, f"{owner.__name__}.{f.name}"
                assert f.type == "Any", f"{owner.__name__}.{f.name}: OmegaConf must not coerce it"
            else:
                assert {"node", "group", "option"} & set(f.metadata), f"{owner.__name__}.{f.name}"


def test_readme_config_keys_table_is_the_generated_one():
    text = README.read_text()
    section = text.split("### Config keys", 1)[1]
    table = "\n".join(line for line in section.split("\n\n")[2].splitlines() if line.startswith("|")) + "\n"
    assert table == schema.markdown_table(), (
        "README's Config keys table is stale: print it with python -m conf"
    )


def test_readme_group_table_lists_each_groups_options():
    text = README.read_text()
    for group in (
        "dataset",
        "model",
        "strategy",
        "aggregator",
        "partition",
        "privacy",
        "tracking",
        "adapter",
        "experiment",
    ):
        row = re.search(rf"^\| `{group}` \| (.*?) \|", text, re.M).group(1)
        assert set(re.findall(r"`(\w+)`", row)) == set(group_options(group)), group


def test_group_options_are_what_a_user_can_choose():
    assert group_options("strategy") == tuple(sorted(schema.STRATEGIES))
    assert set(group_options("partition")) == set(PARTITION_SCHEMES)
    assert group_options("privacy") == ("dp_client", "dp_server", "none", "secagg")
    assert set(group_options("dataset")) == set(SUPPORTED_DATASETS)
    assert not any(o.startswith("base_") for g in ("dataset", "model") for o in group_options(g))


def test_allowed_values_are_imported_from_the_modules_that_own_them():
    assert schema.Quant.__dataclass_fields__["granularity"].metadata["rule"].options is GRANULARITIES
    bits = schema.Partial.__dataclass_fields__["bits"].metadata["rule"]
    assert (bits.min, bits.max) == (MIN_BITS, MAX_BITS)
    assert schema.FedDDPMPlus.__dataclass_fields__["signal"].metadata["rule"].options is SIGNALS
    assert schema.FedDDPM.__dataclass_fields__["aux_allocation"].metadata["rule"].options is AUX_ALLOCATIONS
    assert schema.Dataset.__dataclass_fields__["name"].metadata["rule"].options is SUPPORTED_DATASETS
    assert schema.Autoencoder.__dataclass_fields__["kind"].metadata["rule"].options == tuple(AUTOENCODERS)
    assert schema.Partial.__dataclass_fields__["preset"].metadata["rule"].options == (*PRESETS, "custom")


def test_the_config_record_carries_exactly_the_clients_typed_settings():
    from omegaconf import OmegaConf

    from models import build_scheduler, build_unet
    from server_app.federation import client_config

    cfg = compose_config()
    plain = OmegaConf.to_container(cfg, resolve=True)
    unet = build_unet(plain["model"]["unet"], image_size=28, channels=1)
    record = client_config(cfg, unet, build_scheduler(plain["scheduler"]))
    assert list(record) == [*_JSON_KEYS, *_TYPED_KEYS]
    assert _TYPED_KEYS == {s.key: s.type for s in schema.CLIENT_SETTINGS}
    settings = read_settings(record)
    attributes = {*_JSON_KEYS, *(s.attr for s in schema.CLIENT_SETTINGS)}
    assert {f.name for f in dataclasses.fields(ClientSettings)} == attributes
    assert settings.local_epochs == 0 and settings.lr == cfg.model.lr and settings.eval_fraction == 0.1
    assert isinstance(settings.ema_enabled, bool) and settings.device == "auto"


def test_a_setting_marked_for_clients_reaches_read_settings():
    @dataclasses.dataclass
    class Extra:
        warmup: object = schema.setting(
            5, schema.Int(min=0), "warm-up steps", client=schema.Client("warmup", int)
        )

    extra = tuple(schema._client_settings(Extra))
    assert extra == (schema.ClientSetting("warmup", "warmup", int, "warmup"),)
    # The client's typed keys are the schema's tuple itself: a new entry there is read by read_settings.
    import client_app.task as task

    assert task.CLIENT_SETTINGS is schema.CLIENT_SETTINGS


def test_validation_walks_the_schema_and_reports_every_problem():
    cfg = compose_config(["strategy=quant", "strategy.downlink=int4", "eval.num_samples=1", "device=tpu"])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert "strategy.downlink='int4' is not allowed: weights | int8_weights | int8_delta" in message
    assert "eval.num_samples=1 is not allowed: 0 (no FID) or an integer >= 2" in message
    assert "device='tpu' is not allowed: auto | cpu | cuda" in message


def test_an_unknown_option_name_lists_the_options():
    cfg = compose_config(["strategy.name=bogus"])
    with pytest.raises(ConfigError, match=r"strategy.name='bogus' is not allowed: fedddpm \| fedddpm_plus"):
        validate_config(cfg)
