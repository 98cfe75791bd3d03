"""python -m tiermemd: the same as the tiermemd command."""
from tiermemd.main import main

main()
