from lightning_distill.cli import main

main()
