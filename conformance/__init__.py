"""Conformance: the float64 reference oracle, reproducible problems, the tolerance
model, runners of the core on every backend, and the ``mvn-core`` command line."""
