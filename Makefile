# diffguard — the README's two commands: `make serve` (main command) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Override for GPU hosts, e.g. make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup serve demo test test-fast lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile k8s/checkov-requirements.txt k8s/tools/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	# checkov (tests/unit/test_k8s_checkov.py) pins boto3, packaging and networkx far below the project's: its own venv.
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet -r k8s/checkov-requirements.txt
	# the prometheus-operator CRDs' schemas, for the monitoring manifests (tests/unit/test_k8s_monitoring.py, which
	# skips without them); `make serve` needs no npm (.ci/run installs it, so CI always runs those tests)
	if command -v npm >/dev/null; then npm ci --prefix k8s/tools --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the monitoring manifests' schema tests will skip (apt-get install npm)"; fi
	touch $@

serve: setup ## the README main command: the HTTP service on tiny CPU models, until Ctrl-C
	$(BIN)/diffguard serve $(if $(PORT),--port $(PORT),)

demo: setup
	$(BIN)/diffguard check examples/

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: setup lint ## what CI runs: ruff and the whole suite
	$(BIN)/python -m pytest

test-fast: setup ## the local loop: every test not marked slow (see pyproject.toml markers; < 5 min on a quiet 2-core machine)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

.PHONY: k8s
k8s: setup ## serveConfigV2 from deployments/configs into k8s/, then every overlay rendered by kubectl kustomize to build/k8s/
	$(BIN)/python -m k8s.sync
	mkdir -p build/k8s
	for o in dev dev/scan prod prod/scan; do \
		kubectl kustomize k8s/overlays/$$o > build/k8s/$$(echo $$o | tr / -).yaml || exit 1; done
	ls build/k8s/*.yaml

.PHONY: bench bench-quick bench-gpu
bench: setup ## every benchmark in one run (< 20 min on 2 cores): tables on stdout, JSON + Markdown in bench/results/
	$(BIN)/python -m bench

bench-quick: setup ## the same at small sizes, ViT-B/32 only (< 2 min; CI runs it once as a smoke test)
	$(BIN)/python -m bench --quick

bench-gpu: setup ## on a CUDA machine: ViT-L/14 core (bf16/fp16, batch 1-256) and SD 1.5-sized batched generation; JSON + Markdown in BENCH_GPU_OUT
	$(BIN)/python -m bench.gpu --out $(or $(BENCH_GPU_OUT),build/bench-gpu)

.PHONY: screenshots
screenshots: setup ## docs/page-generate.png, page-moderate.png and review.png from a real `diffguard serve` and `diffguard review` (tiny demo models) in Chromium
	$(BIN)/python -m tools.screenshots

.PHONY: soak reliability reliability-adversarial
soak: setup ## load soak: 64 clients mixing generate and moderate for SOAK_S (300) s on loopback; JSON in build/reliability/
	mkdir -p build/reliability
	$(BIN)/python -m tests.reliability.soak --clients 64 --duration-s $(or $(SOAK_S),300) --out build/reliability/soak.json

reliability: setup ## every reliability scenario, long versions (~20 min on 2 quiet cores); rewrites docs/RELIABILITY.md
	$(BIN)/python -m tests.reliability.report

reliability-adversarial: setup ## only the adversarial-corpus scenario (~3 min); splices its section into docs/RELIABILITY.md
	$(BIN)/python -m tests.reliability.report --only adversarial
