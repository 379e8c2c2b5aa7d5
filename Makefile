# Two commands on a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_CONFIG := publications/config/vq/demo_phantom_cpu.yaml
DEMO_DATA := data/phantom
DEMO_RUN := outputs/ckpt/demo/phantom/2d
DEMO_RESULTS := outputs/results/demo/phantom/2d
DEVICE ?= cpu

.PHONY: setup demo data train evaluate claims test test-long clean-demo

setup: $(STAMP)

# torch/torchvision come from local files on the project's machines (pip, not uv/poetry).
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "setuptools>=64" wheel
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

data: $(STAMP)
	$(PY) publications/src/vq/tools/make_phantom_brats.py -o $(DEMO_DATA) -n 24 --seed 0

# A finished run is kept; an interrupted one is resumed.
train: data
	$(PY) publications/src/vq/train/train_brats_vq_seq2seq_2d.py -d $(DEVICE) -c $(DEMO_CONFIG) \
		$(if $(wildcard $(DEMO_RUN)/ckpt_last.pth),--resume $(DEMO_RUN))

evaluate: train
	$(PY) publications/src/vq/test/test_brats_vq_2d_metrics.py -d $(DEVICE) -c $(DEMO_CONFIG) \
		-l $(DEMO_RUN)/ckpt_best.pth -o $(DEMO_RESULTS) --overwrite

demo: evaluate

# The paper's claims beyond Table 1, on the demo model (a few minutes on CPU).
claims: train
	$(PY) publications/src/vq/test/test_brats_vq_2d_robustness.py -d $(DEVICE) -c $(DEMO_CONFIG) \
		-l $(DEMO_RUN)/ckpt_best.pth -o $(DEMO_RESULTS)/robustness --slices 32 --overwrite
	@cat $(DEMO_RESULTS)/robustness/robustness.md
	$(PY) publications/src/vq/test/test_brats_vq_2d_oneshot_seg.py -d $(DEVICE) -c $(DEMO_CONFIG) \
		-l $(DEMO_RUN)/ckpt_best.pth -o $(DEMO_RESULTS)/oneshot --overwrite
	@cat $(DEMO_RESULTS)/oneshot/oneshot_seg.md

# The suite without its long tests (torchrun, emulated bf16 training, the full benchmark): under 15
# minutes on 2 cores. CI runs both sets.
test: $(STAMP)
	$(PY) -m pytest -q -m "not long" tests

test-long: $(STAMP)
	$(PY) -m pytest -q -m long tests

clean-demo:
	rm -rf $(DEMO_RUN) $(DEMO_RESULTS)
