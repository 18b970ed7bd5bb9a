"""FedDM ServerApp: composes the config, runs the strategy, writes the run folder."""
