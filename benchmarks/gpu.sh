#!/usr/bin/env bash
# What a GPU changes, in one short run (a lent H100/H200, nothing installed but a source checkout):
#   1. the tests that only run on CUDA (2:4 semi-structured conversion, the wanda statistics' fused column sum of
#      squares against a float64 sum) and the masked-product tests;
#   2. the step-cost benchmark on CUDA (bfloat16 pretrained weights, float32 adapters), llama-0.5b at 1 x 128;
#   3. exported-model latency on CUDA: dense, 50% structured (removed heads and channels) and 2:4 turned into
#      PyTorch's semi-structured sparse tensors;
#   4. the user-facing paths (Trainer, distillation, export, command line) on CUDA;
#   5. QLoRA on a 1B model (opt-in, QLORA=1: it needs minutes the other parts use): LoRAPrune's step time and peak
#      GPU memory against PEFT's plain LoRA on the same NF4 base (bitsandbytes), llama-1b at 1 x 512;
#   6. the quality/speed front's latency table on CUDA (benchmarks/front.py): every row of front_smollm2.json
#      rebuilt from its recorded config (random weights of the exported shapes), batch-1 decoding of 128 tokens and
#      a 512-token prefill against the dense model, bfloat16, eager and compiled (torch.compile, CUDA graphs,
#      static cache); FRONT=0 skips it.
# Results go to $RESULTS (default benchmarks/results); logs beside them. Each part has its own time limit so that
# what finished comes back even if a later part runs long.
#
#   RESULTS=/some/dir bash benchmarks/gpu.sh
#   ROUNDS=2 STEP_CONFIGS=lora,loraprune_unstructured EXPORT_ENTRIES=0,2:4 bash benchmarks/gpu.sh
#   QLORA=1 QLORA_ONLY=1 bash benchmarks/gpu.sh     # part 5 alone (needs bitsandbytes installed)
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=$(realpath -m "${RESULTS:-benchmarks/results}")
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
ROUNDS=${ROUNDS:-1}
STEP_CONFIGS=${STEP_CONFIGS:-lora,loraprune_structured,loraprune_structured_lora,loraprune_unstructured,loraprune_unstructured_wanda,loraprune_2of4,loraprune_2of4_wanda,loraprune_unstructured_ste,grad_structured}
EXPORT_ENTRIES=${EXPORT_ENTRIES:-0,0.5,2:4}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name(0))"

if [ "${QLORA_ONLY:-0}" != 1 ]; then
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_semi_structured.py tests/test_masked_linear.py \
    "tests/test_importance.py::test_column_square_sums_off_the_cpu_sum_down_the_rows" \
    2>&1 | tee "$RESULTS/gpu_pytest.log" | tail -15

(cd benchmarks && timeout ${STEP_TIMEOUT:-300} $PY step_cost.py --model llama-0.5b --batch 1 --seq 128 --device cuda \
    --dtype bfloat16 --warmup 3 --steps 10 --rounds "$ROUNDS" --out "$RESULTS" --configs "$STEP_CONFIGS") \
    2>&1 | tee "$RESULTS/gpu_step_cost.log" | grep -v Warning | tail -12

(cd benchmarks && timeout 150 $PY export_speed.py --model llama-0.5b --sparsities "$EXPORT_ENTRIES" --device cuda \
    --dtype float16 --batches 1,16 --seq 512 --repeats 20 --out "$RESULTS") \
    2>&1 | tee "$RESULTS/gpu_export_speed.log" | grep -v "it/s" | tail -8

# 4. the user-facing paths on the GPU: Trainer + callback and DistillationTrainer in bfloat16, export with example
#    inputs on the model's device, the saved adapter through the command line (report, export), the reload
(cd benchmarks && timeout 200 $PY device_walkthrough.py --device cuda --dtype bfloat16 --out "$RESULTS") \
    2>&1 | tee "$RESULTS/gpu_walkthrough.log" | grep -v Warning | tail -12
fi

# 6. the front on CUDA, eager then compiled (each writes front_smollm2_cuda_bfloat16[_compiled].json)
if [ "${QLORA_ONLY:-0}" != 1 ] && [ "${FRONT:-1}" = 1 ] && [ -f benchmarks/results/front_smollm2.json ]; then
    cp -n benchmarks/results/front_smollm2.json "$RESULTS/" 2>/dev/null
    for compiled in "" "--compile"; do
        (cd benchmarks && timeout ${FRONT_TIMEOUT:-240} $PY front.py latency --device cuda --dtype bfloat16 \
            --from_configs $compiled --rounds 3 --repeats 3 --out "$RESULTS") \
            2>&1 | tee -a "$RESULTS/gpu_front.log" | grep -E "decode|Error" | tail -14
    done
fi

# 5. QLoRA on a >= 1B model (QLORA=1; QLORA_ONLY=1 skips parts 1-4): the NF4 base is loaded from a checkpoint of the
#    random model that the first configuration saves to the temporary folder
if [ "${QLORA:-0}" = 1 ]; then
    (cd benchmarks && timeout ${QLORA_TIMEOUT:-420} $PY step_cost.py --model llama-1b --batch 1 --seq 512 --device cuda \
        --dtype bfloat16 --quantization nf4 --warmup 3 --steps 10 --rounds "$ROUNDS" --out "$RESULTS" \
        --configs "${QLORA_CONFIGS:-lora,loraprune_structured,loraprune_unstructured_wanda,loraprune_unstructured_wanda_ste}") \
        2>&1 | tee "$RESULTS/gpu_qlora_step_cost.log" | grep -v Warning | tail -8
fi
