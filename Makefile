# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv on first use from the dev
# lock and reuse it while the locks and pyproject.toml are unchanged (the stamp file is keyed on their hash).
PYTHON ?= python3.11
VENV := .venv
LOCKS := requirements/runtime.lock requirements/dev.lock
LOCK_HASH := $(shell sha256sum $(LOCKS) pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
RUN := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export MPLCONFIGDIR ?= $(CURDIR)/.cache/matplotlib

.PHONY: install system test test-extended demo lock benchmarks clean

install: $(STAMP)

# The dev lock is the runtime lock plus the test and lint tools; every entry is hash-checked.
$(STAMP): $(LOCKS) pyproject.toml
	rm -f $(VENV)/.installed-*
	test -x $(RUN) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements/dev.lock
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# Debian packages some tests need (postgresql, chromium); a no-op once they are installed.
system:
	bash .ci/setup-system

# One intra-op thread per process: the suite's processes (pytest, Ray workers, DeepSpeed ranks, servers)
# already outnumber the cores, and OpenMP's spinning threads slow a shared machine many times over (a tiny
# UNet call measured 7.3 s with 2 threads against 0.34 s with 1 beside other jobs).
test test-extended: export OMP_NUM_THREADS ?= 1
test: system $(STAMP)
	$(RUN) -m pytest -q $(PYTEST_ARGS)

# The long runs left out of `make test` to keep it within CI's time (tests marked `extended`): killed-and-
# resumed trainings, full disks (training and preprocessing), tracking outages, training from object storage
# with a kill, mixtures, the learning check, the reproduction's --quick run, the curation jobs, the killed
# worker node, the promotion race and the serving abuse test (tens of minutes).
test-extended: system $(STAMP)
	$(RUN) -m pytest -q -m extended $(PYTEST_ARGS)

# The whole loop on scikit-image's photos with tiny models: shards (embedded Ray) -> 2 CPU ranks of
# DeepSpeed ZeRO-2, twice (learning rate 1e-3, then 1e-4) -> MLflow runs + registered versions 1 and 2
# -> an image generated from the registered model -> the decision: both versions evaluated on a tiny
# benchmark (Ray Data), compared (HTML + PNG), the better one promoted to the `champion` alias.
DEMO_MLFLOW := sqlite:///$(CURDIR)/outputs/train/demo/mlflow.db
demo: export MLFLOW_TRACKING_URI = $(DEMO_MLFLOW)
demo: $(STAMP)
	rm -rf outputs/inputs/photos outputs/shards/demo outputs/train/demo outputs/train/demo-lr1e-4 \
		outputs/demo outputs/eval/benchmark outputs/eval/demo-v1 outputs/eval/demo-v2 outputs/compare/demo
	$(RUN) -m pipeline.example_inputs outputs/inputs/photos
	$(RUN) -m pipeline.preprocess --config configs/preprocess/demo.yaml
	$(RUN) -m train.launch --config configs/train/demo.yaml --num-gpus 2
	$(RUN) -m train.launch --config configs/train/demo.yaml --num-gpus 2 --set run_name=demo-lr1e-4 \
		output_dir=outputs/train/demo-lr1e-4 optim.lr=1.0e-4
	$(RUN) -m train.generate --config configs/train/demo.yaml --prompt "a [cat] on a beach" \
		--subject skimage:chelsea --steps 10 --out outputs/demo/generated.png
	$(RUN) -m evaluation.benchmark write-demo outputs/eval/benchmark
	$(RUN) -m evaluation.evaluate --config configs/eval/demo.yaml --model-uri models:/mmdiff-demo/1 \
		--set output_dir=outputs/eval/demo-v1
	$(RUN) -m evaluation.evaluate --config configs/eval/demo.yaml --model-uri models:/mmdiff-demo/2 \
		--set output_dir=outputs/eval/demo-v2
	$(RUN) -m evaluation.compare --experiment mmdiff-demo --out outputs/compare/demo
	$(RUN) -m evaluation.promote --model-name mmdiff-demo --versions 1 2 --gates configs/eval/gates_demo.yaml
	@echo "demo done: shards + contact sheet in outputs/shards/demo, generated image outputs/demo/generated.png,"
	@echo "  evaluations outputs/eval/demo-v1 and demo-v2, run comparison report outputs/compare/demo/comparison.html"
	@echo "  (+ comparison.png), serving alias models:/mmdiff-demo@champion"
	@echo "  MLflow runs: $(VENV)/bin/mlflow ui --backend-store-uri $(DEMO_MLFLOW)"

benchmarks: $(STAMP)
	$(RUN) -m benchmarks.run_all

# Re-resolve both locks from pyproject.toml (needs the package index): the runtime lock (what the image
# installs: `mmdiff[runtime]`), then the dev lock on top of it (`mmdiff[dev]`, constrained to the runtime
# pins). Versions already locked are kept; `make lock LOCK_UPGRADE=--upgrade` moves everything to the newest
# release the ranges allow. Hashes cover every file of each pinned release (any platform, any Python).
UV_VERSION := 0.13.9
LOCK_ARGS := --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--custom-compile-command "make lock" $(LOCK_UPGRADE)
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	.venv-lock/bin/uv pip compile pyproject.toml requirements/build.in --extra runtime $(LOCK_ARGS) \
		-o requirements/runtime.lock
	.venv-lock/bin/uv pip compile pyproject.toml requirements/build.in --extra dev -c requirements/runtime.lock \
		$(LOCK_ARGS) -o requirements/dev.lock
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) outputs .cache
