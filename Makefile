.PHONY: up test protos lint format

up:        ## start the local cluster serving the default model
	./scripts/up.sh

test:      ## install, check generated code and lint, run the whole suite
	./scripts/test.sh

protos:    ## regenerate libs/deepserve/v1 from protos/
	.venv/bin/python scripts/gen_protos.py

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .
