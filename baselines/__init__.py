"""Baselines and reference methods, one plugin file each (installed as cpt_bench.baselines)."""
