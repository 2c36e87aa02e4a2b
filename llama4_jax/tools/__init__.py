"""Tools around the run: Hugging Face conversion, the fit check, sweeps, benchmarks, profiling, tables."""
