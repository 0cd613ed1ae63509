"""The proposed method(s), one plugin file each (installed as cpt_bench.methods)."""
