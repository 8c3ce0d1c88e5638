from sevsim.cli import main

main()
