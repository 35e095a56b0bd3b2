from deepserve.flowserve.main import main

main()
