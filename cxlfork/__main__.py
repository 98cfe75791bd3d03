"""`python -m cxlfork` = the cxlfork command."""
from cxlfork.entry import main

main()
