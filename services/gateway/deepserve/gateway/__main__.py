from deepserve.gateway.main import main

main()
