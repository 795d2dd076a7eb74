# `make demo` and `make test` each create .venv, install the package with its test extras, then run.
# The install is redone only when setup.py changes, so a second call is quick.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# tpu: libtpu for `varcmp compile --topology` (deviceless TPU compilation) and its tests.
	$(VENV)/bin/pip install -q -e '.[test,beam,tpu]'
	# The CLIP BPE vocabulary ships in this wheel; --no-deps keeps pip away from torchvision/CUDA torch.
	$(VENV)/bin/pip install -q --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/varcmp demo --workdir runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q -n 2

# Every benchmark at the size of the accelerator present (CPU sizes without one), most important first, under a
# time budget (480 s on an accelerator); rows appended to BENCHMARKS.md. E.g. make bench BENCH_ARGS="--budget 900".
bench: $(STAMP)
	$(VENV)/bin/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs
