.PHONY: up test lint fmt bench

up:  ## install and run the whole appliance on embedded defaults
	python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/nest up

test:  ## install test dependencies and run the whole suite
	scripts/test

lint:  ## ruff, formatting, mypy --strict (libs, services, cli) and the import contracts
	.venv/bin/pip install -q -e '.[dev]'
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports --no-cache

fmt:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench:  ## print the API figures on SQLite and PostgreSQL
	.venv/bin/python bench/api_throughput.py --db sqlite
	.venv/bin/python bench/api_throughput.py --db postgres
