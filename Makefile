.PHONY: up test dev protos lint format units images

up:        ## start the local cluster serving the default model
	./scripts/up.sh

test:      ## install, check generated code and lint, run the whole suite
	./scripts/test.sh

dev:       ## create .venv: every unit installed editable, plus the dev group (re-runs only on a pyproject change)
	./scripts/bootstrap.sh dev

protos: dev    ## regenerate libs/deepserve/v1 from protos/
	.venv/bin/python scripts/gen_protos.py

lint: dev      ## ruff and the import fence, as the test command runs them
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/lint-imports --no-cache

format: dev
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

units: dev     ## each service installed alone into a fresh venv and started; the images' recipes
	.venv/bin/python -m pytest -p no:randomly -q tests/integration/test_unit_installs.py \
		tests/unit/test_dockerfile.py tests/unit/test_compose.py

images:        ## build every image from its own unit (needs a Docker engine)
	docker compose --profile tools build
