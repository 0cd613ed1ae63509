from cpt_bench.cli import main

main()
