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
.PHONY: gpu-kit

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

# Wheels that the device machine's image lacks (see /work/.library/device/KINDS.md) for its
# Python 3.12 on manylinux x86_64, at the versions .venv holds (those the CPU suite runs), no
# dependencies: what the train/edit/eval jobs and the benches import that the image does not
# ship. bench/gpu_session.sh installs them there. bitsandbytes alone is 41 of the 61 MiB, so it
# has its own folder: a device call carries [".whl", ".whl-bnb"] (BENCHMARKS.md, issue #11),
# or ".whl" alone, without nf4.
GPU_KIT := pydantic pydantic-core pydantic-settings annotated-types typing-inspection \
	typing-extensions python-dotenv boto3 botocore s3transfer jmespath datasets dill multiprocess
GPU_KIT_BNB := bitsandbytes
GPU_KIT_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
	manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
GPU_KIT_PIP = $(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: \
	--python-version 3.12 --implementation cp $(addprefix --platform ,$(GPU_KIT_PLATFORMS))
GPU_KIT_PINS = $(BIN)/python -c 'import sys, importlib.metadata as m; \
	print(*(n + "==" + m.version(n) for n in sys.argv[1:]))'

gpu-kit: setup
	rm -rf .whl .whl-bnb
	$(GPU_KIT_PIP) -d .whl $$($(GPU_KIT_PINS) $(GPU_KIT))
	$(GPU_KIT_PIP) -d .whl-bnb $$($(GPU_KIT_PINS) $(GPU_KIT_BNB))
	@ls .whl .whl-bnb
	@du -b -s .whl .whl-bnb | awk '{ mib = $$1 / 2^20; all += mib; \
	  printf "%-9s %5.1f MiB\n", $$2, mib } END { printf "total     %5.1f MiB of the 64 MiB a device call carries (with the working tree)\n", all }'
