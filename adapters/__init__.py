"""Bindings of the rules to frameworks (PyTorch optimizers, optax transformations,
in-place NumPy/CuPy optimizers), generated from :data:`mvn_core.rules`."""
