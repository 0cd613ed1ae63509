"""What every layer uses and nothing here depends on: the one-line error type (`errors`), atomic writes
(`atomic`), the cache folder (`cache`), random states (`rng`), the settings blocks of a suite and `--set`
(`settings`) and progress bars (`progress`). The lowest layer: it imports no other part of cpt_bench."""
