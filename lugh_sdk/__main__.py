from lugh_sdk.cli import main

main()
