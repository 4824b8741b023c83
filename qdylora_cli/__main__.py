from qdylora_cli.cli import main

main()
