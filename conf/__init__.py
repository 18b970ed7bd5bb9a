"""Hydra configuration of FedDM: the schema (`schema.py`), `config.yaml` and the groups' presets.

A package so that the YAML files travel with the code (wheel, Flower FAB) and
Hydra can find them with ``initialize_config_module("conf")``; importing it
registers the schema in Hydra's ConfigStore.
"""

from conf import schema  # noqa: F401 (registers the structured configs)
