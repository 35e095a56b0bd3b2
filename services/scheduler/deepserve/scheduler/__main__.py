from deepserve.scheduler.main import main

main()
