from tiermem.cli import main

main()
