# imzarr: `make convert extract` runs the embedded sample end to end; `make test` runs the whole suite.
# data/ is shared by every interpreter: after a 3.12 run, `make convert extract PYTHON=python3.13` finds the stores
# complete and does nothing. Give another interpreter its own folder with DATA=data-3.13, or `make clean` first
# (README "One data/ for every interpreter").
# The interpreter: PYTHON=… if given, else the first of python3, python3.13, python3.12, python3.11 that runs and
# is a supported version (3.11–3.13). Each interpreter gets its own virtual environment, .venv-3.X.
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' >/dev/null 2>&1 && { echo $$p; break; }; done)
PYVER  := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
ifeq ($(PYVER),)
$(error no supported Python found (3.11, 3.12 or 3.13); pass one, e.g. make test PYTHON=/path/to/python3.12)
endif
VENV   ?= .venv-$(PYVER)
BIN    := $(VENV)/bin
# The torch release the suite is tested with. pip takes its default wheel for the platform: a CUDA build on Linux
# (several GB; it runs on CPU too), or a CPU build where a local wheel index provides one. TORCH=… overrides.
TORCH  ?= torch==2.13.0
# Where the sample and every store go; `make … DATA=data-3.13` on the command line overrides it (the
# environment does not).
DATA   := data
# Override for your own data, e.g. `make convert SRC=~/imagenet64/train STORE=train64.zarr`.
SRC        ?= $(DATA)/sample/train
STORE      ?= $(DATA)/sample.zarr
CHECKPOINT ?=
# Outputs made with a checkpoint are named after it, so that they never clash with the preset's (a store refuses a
# run with another network): CHECKPOINT=path/to/checkpoint_model_001000 writes data/sample_acts-checkpoint_model_001000.zarr.
# A path with spaces works too: make splits words at spaces, so the name is taken with them as underscores, and
# the path itself is passed quoted.
space      := $(subst ,, )
name_of     = $(notdir $(basename $(patsubst %/,%,$(subst $(space),_,$(1)))))
RUN_SUFFIX := $(if $(CHECKPOINT),-$(call name_of,$(CHECKPOINT)))
ACTS       ?= $(DATA)/sample_acts$(RUN_SUFFIX).zarr
LAYERS     ?= encoder_bottleneck,midblock
MODEL_ARGS := $(if $(CHECKPOINT),--checkpoint '$(CHECKPOINT)',--preset tiny-random)

# The embedded sample's classes (converter/sample.py), for `make compare`.
SAMPLE_CLASSES := n01440764,n02119789,n01530575,n02123045,n03417042,n03888257,n04037443,n09472597,n07747607,n03000684
CMP_LAYER      ?= midblock
# Features at σ = 0.5, where the network still sees the image (at σ = 80 every input is mostly noise).
CMP_ARGS       ?= --sigma 0.5 --pool mean

# Test files run in parallel, one per core (at most 4), a file's tests together on one worker: its module fixtures
# (the fault matrix's reference runs, an S3 server) are made once. TEST_WORKERS= runs them one after another.
TEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile

.PHONY: install convert extract compare test test-slow bench clean

install: $(BIN)/imzarr
	@echo "imzarr: installed in $(VENV) (Python $(PYVER)); activate it with: . $(BIN)/activate"

# A download cut off midway (seen with torch's multi-GB CUDA wheels and triton's 200 MB wheel) is tried again whole,
# up to 5 times, waiting longer each time (30 s, then 1, 2 and 4 min): pip's own resume stops at the same byte while
# the connection keeps dropping there, and such a drop has outlasted three tries 30 s apart.
PIP := $(BIN)/pip install --quiet --resume-retries 10
RUN_EXTRAS  := plot,s3
TEST_EXTRAS := dev,plot,s3
define retried
wait=30; for attempt in 1 2 3 4 5; do $(1) && break; [ $$attempt = 5 ] && exit 1; \
	echo "imzarr: pip failed (attempt $$attempt of 5); trying again in $$wait s"; sleep $$wait; wait=$$((wait * 2)); done
endef

# torch is installed first, pinned; pyproject's range then installs nothing more.
$(BIN)/imzarr: pyproject.toml
	@echo "imzarr: installing with $(PYTHON) (Python $(PYVER)) into $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(call retried,$(PIP) '$(TORCH)')
	$(call retried,$(PIP) -e '.[$(RUN_EXTRAS)]')
	@# boto3 (for the tests' S3 server) moves in lockstep with botocore, which s3fs pins: asking for the matching
	@# release spares pip's resolver a walk back through hundreds of boto3 releases.
	$(call retried,$(PIP) "boto3==$$($(BIN)/python -c 'import botocore; print(botocore.__version__)')" -e '.[$(TEST_EXTRAS)]')
	touch $@

$(DATA)/sample/train/train_data_batch_1.npz: | $(BIN)/imzarr
	$(BIN)/imzarr sample $(DATA)/sample

convert: $(BIN)/imzarr $(if $(filter $(DATA)/sample/train,$(SRC)),$(DATA)/sample/train/train_data_batch_1.npz)
	$(BIN)/imzarr convert npz $(SRC) -o $(STORE)
	$(BIN)/imzarr info $(STORE)

extract: $(BIN)/imzarr $(if $(filter $(DATA)/sample.zarr,$(STORE)),$(DATA)/sample.zarr/zarr.json)
	$(BIN)/imzarr extract $(STORE) -o $(ACTS) $(MODEL_ARGS) --layers $(LAYERS)
	$(BIN)/python -c "import xarray as xr; print(xr.open_zarr('$(ACTS)'))"

# `make extract` on a fresh clone converts the sample first.
$(DATA)/sample.zarr/zarr.json: | $(DATA)/sample/train/train_data_batch_1.npz
	$(BIN)/imzarr convert npz $(DATA)/sample/train -o $(DATA)/sample.zarr

# Real sample vs samples generated by the same (default: untrained) model, compared per class in a feature space:
# the generator's own CMP_LAYER at σ = 0.5, or a standard feature network on the clean images with
# FEATURES=fid-inception (pool3: per-class FID) or FEATURES=dinov2-vitl14 (cls: FD_DINOv2), its weights from
# CHECKPOINT_FID=FILE (seeded random weights without it: every output then says "untrained").
FEATURES       ?=
CHECKPOINT_FID ?=
FEATURE_MODEL  := $(if $(FEATURES),$(if $(CHECKPOINT_FID),--checkpoint '$(CHECKPOINT_FID)',--preset $(FEATURES)),$(MODEL_ARGS))
FEATURE_LAYER  := $(if $(FEATURES),$(if $(filter fid-inception,$(FEATURES)),pool3,cls),$(CMP_LAYER))
FEATURE_ARGS   := $(if $(FEATURES),--pool mean,$(CMP_ARGS))
# Named after the generator (RUN_SUFFIX) and the feature network's weights, as the extract target's outputs are.
SPACE          := $(or $(FEATURES),own)$(if $(CHECKPOINT_FID),-$(call name_of,$(CHECKPOINT_FID)))$(RUN_SUFFIX)
GENERATED      := $(DATA)/generated$(RUN_SUFFIX).zarr

compare: $(BIN)/imzarr $(DATA)/sample.zarr/zarr.json
	$(BIN)/imzarr generate -o $(GENERATED) $(MODEL_ARGS) --per-class 100 --classes $(SAMPLE_CLASSES)
	$(BIN)/imzarr extract $(DATA)/sample.zarr -o $(DATA)/real_feats-$(SPACE).zarr $(FEATURE_MODEL) --layers $(FEATURE_LAYER) $(FEATURE_ARGS) --per-class 100
	$(BIN)/imzarr extract $(GENERATED) -o $(DATA)/generated_feats-$(SPACE).zarr $(FEATURE_MODEL) --layers $(FEATURE_LAYER) $(FEATURE_ARGS)
	$(BIN)/imzarr compare $(DATA)/real_feats-$(SPACE).zarr $(DATA)/generated_feats-$(SPACE).zarr --layer $(FEATURE_LAYER) -o $(DATA)/compare-$(SPACE).zarr --plot $(DATA)/compare-$(SPACE).png
	$(BIN)/imzarr show $(DATA)/sample.zarr -o $(DATA)/real_grid.png
	$(BIN)/imzarr show $(GENERATED) -o $(DATA)/generated_grid$(RUN_SUFFIX).png
	$(BIN)/imzarr report $(DATA)/compare-$(SPACE).zarr -o $(DATA)/report

test: $(BIN)/imzarr
	@echo "imzarr: testing with Python $(PYVER) ($(VENV))"
	$(BIN)/python -m pytest -q $(TEST_WORKERS)

test-slow: $(BIN)/imzarr
	$(BIN)/python -m pytest -q -m slow

bench: $(BIN)/imzarr
	$(BIN)/python -m tests.benchmarks

clean:
	rm -rf $(DATA)
