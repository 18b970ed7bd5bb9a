"""FedDM ClientApp: local DDPM training and evaluation on a client's partition."""
