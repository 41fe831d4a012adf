# The README's two commands: `make demo` (the main job, end to end on CPU) and `make test`.
# Both create .venv when missing and install the pinned CPU torch before the package, so that
# pip never resolves a multi-GB CUDA build of torch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megashear-installed
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= runs/demo

.PHONY: venv test demo lint bench smollm2 clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# pytest's exit code 5 (no test collected) is a failure here.
test: venv
	@$(PY) -m pytest -q -ra tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests were collected"; exit 1; fi; exit $$rc

demo: venv
	$(PY) tools/demo.py --out $(DEMO_DIR)

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: venv
	$(PY) tools/bench_train_step.py

# The real pretrained model fixture: SmolLM2-135M-Instruct as an fp32 HF dir, cached (see the tool).
smollm2: venv
	$(PY) tools/fetch_smollm2.py

clean:
	rm -rf $(VENV) runs build *.egg-info
