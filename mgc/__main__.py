"""`python -m mgc` (and `torchrun ... -m mgc run RECIPE`): the command line."""
from mgc.cli import main

main(prog_name="mgc")
