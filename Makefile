# loraforge: `make demo` runs the main flow on CPU, `make test` runs the suite.
# On a CPU-only machine `make setup` installs the CPU wheel of torch first (TORCH_SPEC); the
# CUDA image installs the CUDA wheel instead (see Dockerfile). Override: make setup TORCH_SPEC=torch==2.13.0

PYTHON      ?= python3
VENV        ?= .venv
TOOLS_VENV  ?= .venv-tools
TORCH_SPEC  ?= torch==2.13.0
BIN         := $(VENV)/bin
PYTEST_ARGS ?=
JOB         ?= jobs/train.env
DEMO_DIR    ?= .loraforge/demo

.PHONY: docs image setup test test-s3 test-slow test-gpu test-all test-faults demo lint fmt typecheck policy tools clean
.PHONY: render-examples render-train render-edit render-eval
.PHONY: submit-train submit-edit submit-eval

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp: reinstall only when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The default suite: everything but `slow` and `gpu` (S3 tests included: they start SeaweedFS;
# the policy tests run checkov from the tools venv).
test: setup tools
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-s3: setup
	$(BIN)/python -m pytest -m s3 $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-gpu: setup
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

# The fault and bad-input suite in full (RELIABILITY.md): the kill-and-resume matrix, store
# faults against SeaweedFS, bad inputs through the real entrypoints, secrets scan, load. Its
# fast part also runs in `make test`. RELIABILITY_DIR=dir collects the figures as JSON lines.
test-faults: setup
	$(BIN)/python -m pytest -m "faults and not gpu" $(PYTEST_ARGS)

# The main flow on CPU, offline: tiny kit -> train a LoRA -> edit (abs_select and the
# random_index control) -> eval of base, trained, edited and control adapters.
# The demo directory is the demo's own: it starts afresh (the pretrained tiny base is cached).
demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/loraforge make-tiny $(DEMO_DIR)/tiny
	$(BIN)/loraforge run train --env-file jobs/train.demo.env
	$(BIN)/loraforge run edit --env-file jobs/edit.demo.env
	$(BIN)/loraforge run edit --env-file jobs/edit.demo-control.env
	$(BIN)/loraforge run eval --env-file jobs/eval.demo.env
	@cat $(DEMO_DIR)/store/demo/eval/report.md
	@echo "report: $(DEMO_DIR)/store/demo/eval/report.md (plot beside it)"

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

fmt: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

# Policy linters live in their own venv: checkov pins boto3 below the runtime's floor.
$(TOOLS_VENV)/.installed:
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet checkov==3.3.30
	touch $@

tools: $(TOOLS_VENV)/.installed

policy: tools setup
	$(TOOLS_VENV)/bin/checkov --quiet --compact --skip-download -d k8s --framework kubernetes
	$(BIN)/hadolint Dockerfile

# Kubernetes Jobs from the job specs. `make render-train` prints one (JOB=... for another spec,
# RENDER_FLAGS=... for other flags, e.g. "--gpu auto --s3-secret NAME" against a cluster);
# `make render-examples` rewrites k8s/examples/, which tests/test_render.py diffs against fresh
# renders.
EXAMPLE_FLAGS ?= --gpu a100-80gb --s3-secret loraforge-s3
RENDER_FLAGS  ?= $(EXAMPLE_FLAGS)
render_spec = $(if $(filter command line environment,$(origin JOB)),$(JOB),jobs/$(1).env)

render-train render-edit render-eval: render-%: setup
	@$(BIN)/loraforge render $* --env-file $(call render_spec,$*) $(RENDER_FLAGS)

# Scale-out examples (docs/scale.md): "file job spec [flags]", rendered with EXAMPLE_FLAGS too.
SCALE_EXAMPLES := \
  "train-multinode train jobs/train.multigpu.env" \
  "train-trainjob train jobs/train.multigpu.env --engine trainjob" \
  "train-pytorchjob train jobs/train.multigpu.env --engine pytorchjob" \
  "eval-sharded eval jobs/eval.sharded.env --queue loraforge" \
  "eval-merge eval jobs/eval.sharded.env --merge"

render-examples: setup
	@{ for job in train edit eval; do echo "$$job $$job jobs/$$job.env"; done; \
	   printf '%s\n' $(SCALE_EXAMPLES); } | while read -r name job spec flags; do \
	  cmd="loraforge render $$job --env-file $$spec $(EXAMPLE_FLAGS)$${flags:+ $$flags}"; \
	  { echo "# Rendered by \`make render-examples\`: $$cmd"; \
	    echo "# Do not edit: tests/test_render.py diffs this file against a fresh render."; \
	    $(BIN)/$$cmd; } > k8s/examples/$$name.yaml.tmp \
	  && mv k8s/examples/$$name.yaml.tmp k8s/examples/$$name.yaml \
	  || { rm -f k8s/examples/$$name.yaml.tmp; exit 1; }; \
	done

# Submit a job spec to the cluster of the current kubeconfig context: `make submit-edit` sends
# jobs/edit.env, `make submit-train JOB=jobs/my.env` another spec. SUBMIT_FLAGS: the flags of
# `loraforge submit` (S3 credentials, --gpu, --namespace ...).
SUBMIT_FLAGS ?= --s3-secret loraforge-s3
submit_spec = $(if $(filter command line environment,$(origin JOB)),$(JOB),jobs/$(1).env)

submit-train submit-edit submit-eval: submit-%: setup
	$(BIN)/loraforge submit $* --env-file $(call submit_spec,$*) $(SUBMIT_FLAGS)

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .loraforge .pytest_cache .mypy_cache .ruff_cache

IMAGE ?= loraforge:dev
image:
	docker build -t $(IMAGE) .

# Regenerate the README's settings tables and the job specs' comments from the field docs.
docs: setup
	$(BIN)/python -m loraforge.settings.spec
