from deepserve.flowserve.pod.main import main

main()
