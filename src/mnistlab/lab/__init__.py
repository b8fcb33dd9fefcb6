"""Many runs and measurements: seed sweeps, ensembles, comparisons, the benchmark and the reference recipes."""
