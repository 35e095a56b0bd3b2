from deepserve.podpool.main import main

main()
