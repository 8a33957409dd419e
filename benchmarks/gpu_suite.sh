#!/usr/bin/env bash
# The GPU benchmarks and GPU tests, in parts that each fit one 10-minute call on a lent GPU machine.
#
#   bash benchmarks/gpu_suite.sh setup {model | model-more | model-b512 | data | e2e | tests}...   (results go to $OUT)
#
# `setup` installs what the GPU image lacks from wheels carried in .whl/ (pydantic and its helpers,
# decord; see benchmarks/README.md) plus maeframe itself without dependencies (its plugins register
# through entry points), and puts the Fashion-MNIST files carried in .fmnist/ where the tests and
# loader.py look for them. Every part writes its JSON and logs straight to $OUT, so a part cut off by the
# time limit still returns what it finished.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
B=benchmarks

setup() {
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
    mkdir -p /usr/share/datasets/fashion-mnist && cp .fmnist/*.gz /usr/share/datasets/fashion-mnist/
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch, timm, transformers; print(torch.__version__, torch.version.cuda, timm.__version__, transformers.__version__)"
}

model() {  # ViT-B and ViT-L against both references; a profile of the compiled ViT-B step
    $PY $B/pretrain_step.py recipes/image_mae_vitb.yaml --batch-size 256 --compile --references hf,official \
        --steps 20 --warmup 5 --repeats 2 --profile $OUT/h100-vitb-b256-compile-profile.txt \
        --out $OUT/h100-vitb-b256-compile.json 2>&1 | grep -v Warning
    $PY $B/pretrain_step.py recipes/image_mae_vitb.yaml model.embed_dim=1024 model.depth=24 model.num_heads=16 \
        --batch-size 256 --compile --references hf,official --steps 15 --warmup 5 --repeats 2 \
        --out $OUT/h100-vitl-b256-compile.json 2>&1 | grep -v Warning
    $PY $B/pretrain_step.py recipes/image_mae_vitb.yaml --batch-size 256 --no-compile --references hf,official \
        --steps 20 --warmup 5 --repeats 2 --out $OUT/h100-vitb-b256-eager.json 2>&1 | grep -v Warning
}

model-more() {  # levers: flash attention instead of cuDNN's, CUDA graphs (larger batches: model-b512)
    $PY $B/pretrain_step.py recipes/image_mae_vitb.yaml --batch-size 256 --compile --no-reference \
        --no-cudnn-attention --steps 20 --warmup 5 --repeats 2 --profile $OUT/h100-vitb-b256-flash-profile.txt \
        --out $OUT/h100-vitb-b256-flash.json
    $PY $B/pretrain_step.py recipes/image_mae_vitb.yaml runtime.compile_mode=reduce-overhead optim.accum_steps=1 --batch-size 256 \
        --compile --no-reference --steps 20 --warmup 5 --repeats 2 --out $OUT/h100-vitb-b256-cudagraphs.json
}

jpeg_and_packed() {  # 10,000 real Fashion-MNIST images as 256² JPEGs, and the same packed
    [ -f /tmp/pk/packed/index.json ] && return
    $PY $B/loader.py --make-image-folder /tmp/pk/jpeg --count 10000 --side 256
    maeframe pack /tmp/pk/jpeg /tmp/pk/packed --size 256 --workers 14
}

data() {  # mask-ratio scaling; loader throughput; end-to-end pretraining from packed data
    $PY $B/scaling.py --sizes small,base,large --batch-size 128 --steps 10 --warmup 3 \
        --out $OUT/h100-scaling.json --plot $OUT/h100-scaling.png
    jpeg_and_packed
    $PY $B/loader.py \
        --case jpeg-imagefolder recipes/image_mae_vitb.yaml data.train.options.root=/tmp/pk/jpeg \
        --case packed recipes/image_mae_vitb_packed.yaml data.train.options.path=/tmp/pk/packed \
        --workers 4 8 14 --batch-size 256 --batches 20 --warmup 4 --threads 1 --out $OUT/h100-loader.json
    e2e
}

e2e() {  # the real engine from packed shards on disk, one optimizer step per 256 images, 4 epochs of 39 steps
    jpeg_and_packed
    rm -rf /tmp/runs/image_mae_vitb_packed  # a warm machine keeps the last call's run
    maeframe run recipes/image_mae_vitb_packed.yaml data.train.options.path=/tmp/pk/packed optim.accum_steps=1 \
        runtime.output_dir=/tmp/runs runtime.max_steps=156 runtime.log_interval=13 runtime.progress_bar=false \
        optim.epochs=4 optim.warmup_epochs=1 2>&1 | tail -3 | tee $OUT/h100-e2e-packed.log
    cp /tmp/runs/image_mae_vitb_packed/metrics.jsonl $OUT/h100-e2e-packed-metrics.jsonl
}

model-b512() {
    $PY $B/pretrain_step.py recipes/image_mae_vitb.yaml --batch-size 512 --compile --no-reference \
        --steps 20 --warmup 5 --repeats 2 --out $OUT/h100-vitb-b512-compile.json
    $PY $B/pretrain_step.py recipes/image_mae_vitb.yaml model.embed_dim=1024 model.depth=24 model.num_heads=16 \
        --batch-size 512 --compile --no-reference --steps 15 --warmup 5 --repeats 2 \
        --out $OUT/h100-vitl-b512-compile.json
}

tests() {
    $PY -m pytest -q -rA -p no:warnings tests/test_devices.py -k cuda 2>&1 | grep -E "PASSED|FAILED|ERROR|Error"
}

for part in "$@"; do
    echo "=== $part ($(date +%T))"
    if [ "$part" = setup ]; then setup; export PYTHONPATH=/tmp/site; else "$part"; fi
done
