# One command sets up and runs each job from a fresh clone: `make test`, `make demo`.
PY ?= python3
# The CPU build of torch that lies on this project's machines; a GPU machine keeps its own torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := .make/deps-stamp

.PHONY: install test test-fast test-verl verl-install lint demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]" --config-settings editable_mode=compat
	@mkdir -p $(dir $@) && touch $@

install: $(STAMP)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The whole suite; on a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1
# (tests/conftest.py sets it before triton is imported). verl's tests need verl-install; when
# it cannot install here they skip (pytest's summary lists the skip).
test: install verl-install lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Evaluate the shipped student, distill it from the shipped teacher with ReNIO, evaluate again;
# prints accuracy before/after and the run directory (runs/<time>-renio).
demo: install
	$(PY) -m renio_kernels.train

# tests/integrations/test_verl.py: verl 0.9.1 beside [test], whose transformers>=5.19 verl's pin
# (<5.11) excludes, so verl comes without its dependencies, plus what its loss path imports
# (docs/verl.md; each checked with pip install --dry-run not to change torch or transformers).
VERL_STAMP := .make/verl-stamp
$(VERL_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps verl==0.9.1 tensordict==0.10.0 pyvers==0.1.0
	$(PY) -m pip install -q ray==2.60.0 hydra-core==1.3.8 codetiming==1.4.0 orjson \
		importlib_metadata cloudpickle peft==0.21.2
	@mkdir -p $(dir $@) && touch $@

# Best effort inside `make test`: a machine that cannot install verl still runs everything else.
verl-install: $(STAMP)
	@$(MAKE) --no-print-directory $(VERL_STAMP) || echo "*** verl could not be installed: \
	tests/integrations/test_verl.py will be skipped ***"

test-verl: $(VERL_STAMP)
	$(PY) -m pytest -q tests/integrations/test_verl.py

BENCH_STAMP := .make/bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[bench]" --config-settings editable_mode=compat
	@mkdir -p $(dir $@) && touch $@

# The CPU quick mode (about 10 minutes on 2 cores): appends rows to
# benchmarks/results/<device>.csv and writes the plots and the markdown table beside it.
# BENCH_ARGS passes options through, e.g. BENCH_ARGS="--preset cpu-full --threads 2".
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks run --preset cpu-quick $(BENCH_ARGS)

clean:
	rm -rf .make build *.egg-info .pytest_cache
