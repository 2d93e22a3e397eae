"""``mvn-core bench``: the time and memory of one optimizer step, rule by rule, on every
backend and execution path, against the peers measured in the same run."""
