# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install the package with the extras they need.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.adapter-engine-installed
# CPU-only machines get the CPU build of torch (a plain `pip install torch` may pull a multi-GB CUDA build).
CPU_TORCH ?= torch==2.13.0

.PHONY: demo test test-cuda bench lint install clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	if nvidia-smi -L >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q "$(CPU_TORCH)"; fi
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/adapter-engine demo $(DEMO_ARGS)

# CPU tier: every Triton kernel in the interpreter at small shapes, plus the bench scripts at tiny sizes.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests bench --benchmark-json=$(VENV)/bench-smoke.json
	$(PY) bench/report.py $(VENV)/bench-smoke.json --out $(VENV)/bench-smoke > /dev/null

test-cuda: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -p no:cacheprovider -m cuda tests

bench: $(STAMP)
	bash bench/gpu_check.sh bench/results/latest

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
