from secfed.cli import main

main()
