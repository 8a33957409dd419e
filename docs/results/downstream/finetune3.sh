#!/bin/bash
# Fine-tuning comparison over 3 seeds (session 2, after the helpers): MAE encoder (4-epoch pretraining pt_s$s)
# vs the same ViT from scratch, 3 epochs on 10k = 117 steps, light augmentation, evaluated on 5k test images.
export OMP_NUM_THREADS=1
SUB="data.train.options.limit=10000 data.eval.options.limit=5000 data.num_workers=0 runtime.threads=1"
LIGHT="augment.mixup=0 augment.cutmix=0 augment.rand_augment=null augment.random_erasing=0"
SCHED="optim.epochs=3 optim.warmup_epochs=0.5 runtime.progress_bar=false"
s=$1
case $2 in
  mae)     nice -n 10 /work/exp/.venv/bin/maeframe run recipes/finetune_fmnist.yaml name=ft3b_mae_s$s seed=$s init.checkpoint=runs/pt_s$s/last.pt $SUB $SCHED $LIGHT ;;
  scratch) nice -n 10 /work/exp/.venv/bin/maeframe run recipes/finetune_fmnist.yaml name=ft3b_scratch_s$s seed=$s init.format=none $SUB $SCHED $LIGHT ;;
esac
