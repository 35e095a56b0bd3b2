from deepserve.jobmgr.main import main

main()
