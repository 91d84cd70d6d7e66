#!/usr/bin/env bash
# CUDA paths of the runner on one GPU: bf16 + DeepSpeed's FusedAdam + hybrid engine (ZeRO-2), fp16 + ZeRO-3 actor
# and critic + EMA + LoRA, bf16 SFT, ZeRO-3 rollouts from a whole copy vs the shards, rollouts through vLLM vs
# generate() (when vllm is installed); PPO time per step split into generation / experience / training; the memory
# plan's calibration (predicted vs measured peak per device).
#   bash bench/gpu_check.sh OUT_DIR SFT_EXPORT REWARD_EXPORT
# Writes each run's log tail and summary.json into OUT_DIR and prints a table.
set -u
OUT=${1:?OUT_DIR}; SFT=${2:?SFT export}; RM=${3:?reward export}
export HF_HUB_OFFLINE=1
python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())"
P="step=ppo step.actor_from=$SFT step.critic_from=$RM data.sets.tiny.splits.eval=heldout step.generation_batch_size=32
   train.micro_batch_size=16 step.max_prompt_len=32 step.generation.max_new_tokens=16 optimizer.lr=1e-4
   step.critic.lr=1e-4 scheduler.warmup_steps=5 deployment=single_gpu train.eval_max_batches=2"
run() {  # name, overrides...
  local name=$1; shift
  local start=$(date +%s)
  python3 -m runner run_dir=/tmp/gpu_check/$name "$@" > /tmp/gpu_check_$name.log 2>&1
  local rc=$?
  echo "== $name: exit $rc in $(( $(date +%s) - start )) s"
  tail -n 60 /tmp/gpu_check_$name.log > "$OUT/$name.log"
  grep -h "hybrid engine\|Error\|error" /tmp/gpu_check_$name.log | grep -v "^\[rank" | head -5
  cp /tmp/gpu_check/$name/summary.json "$OUT/${name}_summary.json" 2>/dev/null
}
run ppo_bf16_zero2_fusedadam_he $P precision=bf16 optimizer.impl=deepspeed zero=stage2 step.hybrid_engine.enabled=true \
    train.max_steps=30 train.eval_every=15
run ppo_fp16_zero3_ema_lora $P precision=fp16 optimizer.impl=deepspeed zero=stage3 zero@step.critic.zero=stage3 \
    step.hybrid_engine.enabled=true step.ema.enabled=true lora.r=8 train.max_steps=20 train.eval_every=10
run sft_bf16 precision=bf16 deployment=single_gpu optimizer.impl=deepspeed train.max_steps=100
# a ZeRO-3 actor's rollouts from its whole copy vs through its shards (step.rollout.gathered_copy): the same rewards,
# and the generation time of each
run ppo_bf16_zero3_copy $P precision=bf16 optimizer.impl=deepspeed zero=stage3 zero@step.critic.zero=stage3 \
    train.max_steps=20 train.eval_every=10
run ppo_bf16_zero3_shards $P precision=bf16 optimizer.impl=deepspeed zero=stage3 zero@step.critic.zero=stage3 \
    step.rollout.gathered_copy=false train.max_steps=20 train.eval_every=10
# what one device shows of the parallelism issue: ZeRO++ (qwZ + qgZ, hpZ=1), Lion and Muon on CUDA
run sft_zeropp precision=bf16 deployment=single_gpu zero=stage3_zeropp zero.zero_hpz_partition_size=1 train.max_steps=50
run sft_lion precision=bf16 deployment=single_gpu optimizer=lion train.max_steps=50
run sft_muon precision=bf16 deployment=single_gpu optimizer=muon train.max_steps=50
# rollouts through vLLM vs transformers' generate() (step.rollout.backend), same model, sampling and steps: the
# generation time per step of each, and vLLM's log-prob mismatch with the actor (train/logprob_mismatch)
if python3 -c "import vllm" 2>/dev/null; then
  run ppo_bf16_zero3_hf $P precision=bf16 optimizer.impl=deepspeed zero=stage3 zero@step.critic.zero=stage3 \
      train.max_steps=20 train.eval_every=10
  run ppo_bf16_zero3_vllm $P precision=bf16 optimizer.impl=deepspeed zero=stage3 zero@step.critic.zero=stage3 \
      step.rollout.backend=vllm train.max_steps=20 train.eval_every=10
  run ppo_bf16_zero2_lora_vllm $P precision=bf16 optimizer.impl=deepspeed zero=stage2 lora.r=8 \
      step.rollout.backend=vllm step.rollout.vllm.sleep_level=1 train.max_steps=10 train.eval_every=5
else
  echo "== vllm: not installed here (pip install .[vllm]); step.rollout.backend=vllm NOT checked"
fi
# the memory plan against torch.cuda.max_memory_allocated (one-rank cases; bench/calibrate_memory.py)
python3 bench/calibrate_memory.py --gpu > "$OUT/calibrate_memory.md" 2>&1; tail -n 20 "$OUT/calibrate_memory.md"
python3 - "$OUT" <<'PY'
import json, sys, pathlib, statistics
for path in sorted(pathlib.Path("/tmp/gpu_check").glob("*/metrics.jsonl")):
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    s = json.loads((path.parent / "summary.json").read_text()) if (path.parent / "summary.json").exists() else {}
    if any("train/gen_time_s" in r for r in rows):
        med = lambda k: statistics.median(r[k] for r in rows[3:] if k in r)
        print(f"{path.parent.name}: gen {med('train/gen_time_s'):.3f} s  experience {med('train/experience_time_s'):.3f} s"
              f"  train {med('train/train_time_s'):.3f} s per step; eval reward {s.get('eval_reward_initial')} -> "
              f"{s.get('eval_reward_final')}; {s.get('hybrid_engine')}"
              + (f"; logprob mismatch {med('train/logprob_mismatch'):.4f}" if any("train/logprob_mismatch" in r for r in rows) else ""))
    else:
        print(f"{path.parent.name}: loss {s.get('train_loss_first')} -> {s.get('train_loss_last')}")
PY
