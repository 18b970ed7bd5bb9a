"""Hydra configuration of FedDM: `config.yaml` and its groups.

A package so that the YAML files travel with the code (wheel, Flower FAB) and
Hydra can find them with ``initialize_config_module("conf")``.
"""
