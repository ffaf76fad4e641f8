# safespot: make install && make demo    |    make test
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Use the shared offline data copy when it is there, ./data otherwise (override: make train DATA_DIR=...)
DATA_DIR ?= $(if $(wildcard ../shared/data/cifar10-jpeg),../shared/data,./data)
export DATA_DIR

.PHONY: install demo train test check-reports gpu-check reproduce-paper003 reproduce-figure3 reproduce-figure3-adv test-slow test-all test-gpu lint format bench bench-gpu reproduce-cifar10-reduced reproduce-cifar10-l2 reproduce-safe-spot-aware reproduce-smoothed reproduce-table4 reproduce-paper004

install:  ## create .venv and install the package with its dev extras (TORCH_INDEX=https://download.pytorch.org/whl/cpu: CPU-only torch first)
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install torch torchvision --index-url $(TORCH_INDEX))
	$(PY) -m pip install -e ".[dev]"

demo:  ## the headline in one go: fast adversarial training, PGD-20 and S-Full robustification on 200 test images (~5 min on 2 CPU cores)
	$(PY) -m safespot.demo $(ARGS)

train:  ## quickstart: PGD adversarial training of a small CNN on a CIFAR-10 subset (~5 min on 2 CPU cores)
	$(PY) train.py experiment=quickstart $(ARGS)

test:  ## the default test suite (about 8 minutes on 2 idle cores; slow and CUDA tests excluded)
	$(PY) -m pytest -q $(ARGS)

test-slow:  ## only the slow tests
	$(PY) -m pytest -q -m slow $(ARGS)

test-all:  ## every test
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

test-gpu:  ## every entry point end to end on CUDA (tests/gpu, marker cuda; SAFESPOT_TEST_DEVICE=cpu: dry run on the CPU)
	$(PY) -m pytest -q -m cuda tests/gpu $(ARGS)

lint:
	$(VENV)/bin/ruff check src tests bench train.py evaluate.py robustify.py ood.py
	$(VENV)/bin/ruff format --check src tests bench train.py evaluate.py robustify.py ood.py

format:
	$(VENV)/bin/ruff check --fix src tests bench train.py evaluate.py robustify.py ood.py
	$(VENV)/bin/ruff format src tests bench train.py evaluate.py robustify.py ood.py

bench:  ## benchmarks (figures go into docs/benchmarks.md)
	$(PY) bench/bench_adv_step.py --quick
	$(PY) bench/bench_pgd_cost.py --quick
	$(PY) bench/bench_robustifier.py --quick
	$(PY) bench/bench_method_steps.py --quick
	$(PY) bench/bench_certify.py --quick
	$(PY) bench/bench_smoothed_attack.py --quick
	$(PY) bench/bench_loader.py --quick
	$(PY) bench/bench_user_figures.py --quick
	$(PY) bench/bench_noise_injection.py --quick

gpu-check:  ## the one prepared GPU check (8 min on one H100): test-gpu, bench-gpu, a full-scale mini-reproduction, one report (SAFESPOT_TEST_DEVICE=cpu GPU_CHECK_SCALE=tiny: CPU dry run)
	$(PY) bench/gpu_check.py --scale $(or $(GPU_CHECK_SCALE),full) --device $(or $(SAFESPOT_TEST_DEVICE),cuda) $(ARGS)

bench-gpu:  ## GPU throughput table: WRN-34-10 and small CNN, fp32/bf16, PGD, training step, robustifier (ARGS="--quick --device cpu": dry run)
	$(PY) bench/bench_gpu.py $(ARGS)

reproduce-cifar10-reduced:  ## paper 002 Table 1 / paper 000 Table 1 left: reduced natural/preemptive/ADV models + robustification grid at l_inf 8/255 (conf/reproduce/cifar10_linf.yaml; the models kept; their evaluations about 5 h on 2 CPU cores, the grids in pieces that keep over sittings)
	$(PY) -m safespot.reproduce run cifar10_linf $(ARGS)

reproduce-cifar10-l2:  ## paper 002 Table 2 / paper 000 Table 1 right: reduced natural/preemptive/ADV models at l_2 eps = delta = 0.5, S-Full's beta chosen on validation images (conf/reproduce/cifar10_l2.yaml)
	$(PY) -m safespot.reproduce run cifar10_l2 $(ARGS)

reproduce-safe-spot-aware:  ## paper 000 Table 1 left, rows S-FGSM+ADV and S-PGD+ADV next to ADV (reduced, l_inf; conf/reproduce/safe_spot_aware.yaml, whose header names the `safespot-reproduce adopt` commands that take ADV and S-FGSM+ADV from cifar10_linf's records; then ARGS='--out DIR')
	$(PY) -m safespot.reproduce run safe_spot_aware $(ARGS)

reproduce-smoothed:  ## paper 002 Tables 5 and 7: smoothed Gaussian models, None vs S-Full, randomised PGD and CERTIFY (reduced; conf/reproduce/smoothed.yaml)
	$(PY) -m safespot.reproduce run smoothed $(ARGS)

check-reports:  ## every kept report (and generated block of the docs) equals what its kept records render
	$(PY) -m safespot.reproduce check

reproduce-table4:  ## paper 000 Table 4: OOD detection on the CIFAR-10 class split, 3 training seeds, paired AUROC claims with intervals over seeds (reduced; conf/reproduce/table4.yaml)
	$(PY) -m safespot.reproduce run table4 $(ARGS)

reproduce-paper004:  ## paper 004 Table 1: PGD-AT / TRADES / AWP / FLSS (SD 2 and 1) with rejection, bootstrap intervals, the equal-budget FLSS rows (reduced; conf/reproduce/paper004.yaml)
	$(PY) -m safespot.reproduce run paper004 $(ARGS)

reproduce-paper003:  ## paper 003: smoothed inference on reduced ResNet-20 ADV / PNI-W / CNI-W models, with intervals and verdicts (conf/reproduce/paper003.yaml)
	$(PY) -m safespot.reproduce run paper003 $(ARGS)

reproduce-figure3:  ## paper 002 Figure 3 on the demo model: reconstruction of x_o from x_r, search from x_o vs a random start, l_2 and l_inf (conf/reproduce/figure3.yaml)
	$(PY) -m safespot.reproduce run figure3 $(ARGS)

reproduce-figure3-adv:  ## paper 002 Figure 3 on the reduced ADV model at l_2 0.5 (conf/reproduce/figure3_adv.yaml; its model is cifar10_linf's: `safespot-reproduce adopt figure3_adv adv docs/records/cifar10_linf/train/adv --out DIR` first, then ARGS='--out DIR')
	$(PY) -m safespot.reproduce run figure3_adv $(ARGS)
