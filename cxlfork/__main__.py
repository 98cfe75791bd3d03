"""`python -m cxlfork` = the cxlfork command."""
from cxlfork.cli import main

main(prog_name="cxlfork")
