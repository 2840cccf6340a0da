# imzarr: `make convert extract` runs the embedded sample end to end; `make test` runs the whole suite.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
DATA   := data
# Override for your own data, e.g. `make convert SRC=~/imagenet64/train STORE=train64.zarr`.
SRC        ?= $(DATA)/sample/train
STORE      ?= $(DATA)/sample.zarr
ACTS       ?= $(DATA)/sample_acts.zarr
LAYERS     ?= encoder_bottleneck,midblock
CHECKPOINT ?=
MODEL_ARGS := $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),--preset tiny-random)

.PHONY: install convert extract compare test test-slow bench clean

install: $(BIN)/imzarr

# torch is installed first as the CPU build 2.13.0; pyproject's range then installs nothing more.
# GPU users: see README ("Installing with CUDA").
$(BIN)/imzarr: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,plot]'
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

test: $(BIN)/imzarr
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/imzarr
	$(BIN)/python -m pytest -q -m slow

bench: $(BIN)/imzarr
	$(BIN)/python -m tests.benchmarks

clean:
	rm -rf $(DATA)
