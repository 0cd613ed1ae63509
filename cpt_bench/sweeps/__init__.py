"""`cpt-bench sweep`: grid files expanded into runs with their predicted result files (`grid`), and the
executors that start them (`executors`: local worker processes, SLURM; one file each)."""
