from deepserve.flowserve.runner.cpu_huge_pages import ask_for_huge_pages

ask_for_huge_pages()  # before torch loads (with the pod's modules)

from deepserve.flowserve.pod.main import main  # noqa: E402

main()
