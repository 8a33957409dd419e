# Two entry points: `make demo` (install + pretrain on real Fashion-MNIST) and `make test` (install + tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject) to the build these machines serve locally; pyproject accepts >=2.4.
# torchaudio 2.11 declares no torch pin and runs beside torch 2.14 (fbank, MelSpectrogram); so does torchcodec
# 0.17 (decodes the test clips, tests/test_video_decoders.py), which each torch release pairs with its own.
TORCH := torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0 torchcodec==0.17.0
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
KLETTRES := /usr/share/klettres/en/alpha
# Fonts drawing the letters of the spoken-letter clips (klettres_letters): DejaVu, Liberation, FreeFont.
FONTS := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
# FFmpeg's libraries (torchcodec, the second video decoder) and its CLI (writes the video benchmark's clips).
FFMPEG := /usr/bin/ffmpeg
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=69" wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Real offline data from Debian: Fashion-MNIST images and spoken-letter recordings (klettres); fonts; FFmpeg.
data: $(FASHION_MNIST) $(KLETTRES) $(FONTS) $(FFMPEG)

$(FASHION_MNIST) $(KLETTRES):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist klettres-data

$(FONTS):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq fonts-dejavu-core fonts-liberation fonts-freefont-ttf

$(FFMPEG):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends ffmpeg

demo: install data
	rm -rf runs/quickstart
	$(VENV)/bin/maeframe run recipes/quickstart.yaml
	@echo "reconstructions: $$(ls runs/quickstart/reconstructions/*.png | tail -1)"

test: install data
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/pretrain_step.py recipes/quickstart.yaml --batch-size 64 --steps 20 --warmup 3 --references hf,official

clean:
	rm -rf $(VENV) runs build *.egg-info
