#!/usr/bin/env bash
# make table-smile: the tiny CLIP table (3 seeds: experts fine-tuned, then SMILE grid, top_k ablation,
# baselines and projection merging per seed), the tiny Flan-T5 tables (full and LoRA experts: fine-tuned,
# then baselines and the SMILE grid per seed), the tiny Mistral arm, then analyze.py. The slow real-model arm
# (SmolLM2-135M with math and code LoRA experts, ~30 CPU-min a seed) runs only when asked: ARMS=smollm2.
# SCALE=real: SMILE over the SmolLM2-135M expert zoo through the leaderboard (below).
# Env: SCALE=tiny|real|paper, PY=<python>, SEEDS (default "0 1 2"), ARMS (default "clip_distinct clip t5_full t5_lora mistral").
set -euo pipefail
SCALE=${SCALE:-tiny}
PY=${PY:-python}
if [ "$SCALE" = paper ]; then
    # The seed README's CLIP-ViT-B/32 grid at paper scale (GPUs, network, tanganke's checkpoints).
    OUT=runs/smile/paper/ViT-B-32
    for gate_k in 1 2 4 8 16 32 64 128 256 512 768; do
        for k in 4 8 16 32 64 128 -1; do
            $PY -m projects.smile.main method=smile_upscaling/smile_upscaling method.device=cuda \
                method.gate_k=$gate_k method.k=$k scale=paper \
                modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 \
                taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 \
                report_save_path="$OUT/eight_tasks/gate_k=${gate_k}_k=${k}.json"
        done
    done
    # The seed README's Flan-T5-base grids (full and LoRA-16 experts) on GLUE as text generation.
    for gate_k in 4 8 16 32; do
        for k in 16 32 64 128; do
            $PY -m projects.smile.main method=smile_upscaling/smile_upscaling method.device=cpu \
                method.gate_k=$gate_k method.k=$k scale=paper modelpool=Seq2SeqLMPool/flan-t5-base_glue \
                taskpool=flan-t5_glue_text_generation \
                report_save_path="runs/smile/paper/flan-t5-base/glue_text_generation/gate_k=${gate_k}_k=${k}.json"
        done
    done
    for gate_k in 2 4 8; do
        for k in 4 8 16; do
            $PY -m projects.smile.main method=smile_upscaling/smile_upscaling method.device=cuda \
                method.gate_k=$gate_k method.k=$k scale=paper modelpool=Seq2SeqLMPool/flan-t5-base_glue_lora16 \
                taskpool=flan-t5_glue_text_generation \
                report_save_path="runs/smile/paper/flan-t5-base_lora16/glue_text_generation/gate_k=${gate_k}_k=${k}.json"
        done
    done
    exit 0
fi
if [ "$SCALE" = real ]; then
    # SMILE as a router over the 13 expert-zoo LoRA experts of SmolLM2-135M (issue 17): the leaderboard picks
    # (gate_k, k, top_k) on the library tasks' validation split and reads each test split once, beside the
    # oracle, the uniform merge and task arithmetic, for zoo seeds 0 and 1 (needs `make zoo`; results are
    # reused per seed and entry); then where the chosen model routes each task's tokens, per layer; then the
    # table, claims' metrics and plots (runs/smile/real/table/real_zoo/).
    LB=${LEADERBOARD_OUT:-results/leaderboard}
    $PY -m leaderboard.run --entries smile smile_top8 uniform task_arithmetic oracle --seeds 0 1 --out "$LB"
    $PY -m leaderboard.smile_routing --seeds 0 1 --out "$LB"
    $PY -m projects.smile.analyze runs=runs/smile/real out=runs/smile/real/table leaderboard="$LB"
    exit 0
fi
OUT=runs/smile/$SCALE
SEEDS=${SEEDS:-0 1 2}
ARMS=${ARMS:-clip_distinct clip t5_full t5_lora mistral}
for seed in $SEEDS; do
    [[ " $ARMS " == *" clip "* ]] || continue
    $PY -m projects.smile.finetune --config projects/smile/configs/tiny_finetune.yaml \
        seed=$seed out=$OUT/experts/seed_$seed
    $PY -m projects.smile.sweep --config projects/smile/configs/tiny_sweep.yaml \
        seed=$seed expert_root=$OUT/experts/seed_$seed out=$OUT/seed_$seed
done
# The tiny CLIP on eight distinct visual domains (TINY_CLIP_DISTINCT_TASKS: digits, silhouettes, rendered
# scripts, shapes, textures; issue 17), the same budget and sweep as the clip arm.
for seed in $SEEDS; do
    [[ " $ARMS " == *" clip_distinct "* ]] || continue
    $PY -m projects.smile.finetune --config projects/smile/configs/tiny_finetune_distinct.yaml \
        seed=$seed out=$OUT/clip_distinct/experts/seed_$seed
    $PY -m projects.smile.sweep --config projects/smile/configs/tiny_sweep_distinct.yaml \
        seed=$seed expert_root=$OUT/clip_distinct/experts/seed_$seed out=$OUT/clip_distinct/seed_$seed
    # where SMILE at the seed's validation-chosen (gate_k, k) (the sweep's smile_selected_config) routes 200
    # validation images of each task, every token, per encoder layer (analyze.py: clip_routing_table, heat map)
    read -r GK K < <($PY -c "import json, sys; c = json.load(open(sys.argv[1]))['metrics']['smile_selected_config']; print(c['gate_k'], c['k'])" \
        "$OUT/clip_distinct/seed_$seed/summary/results.json")
    $PY -m projects.smile.main method=smile_upscaling/smile_upscaling method.gate_k=$GK method.k=$K \
        modelpool=CLIPVisionModelPool/tiny_clip_distinct8 modelpool.expert_root=$OUT/clip_distinct/experts/seed_$seed \
        taskpool=CLIPVisionModelTaskPool/tiny_clip_distinct8 taskpool.split=validation +taskpool.routing=200 \
        experiment=tiny_clip_distinct_routing seed=$seed \
        report_save_path=$OUT/clip_distinct/routing/seed_${seed}_gate_k=${GK}_k=${K}.json
done
# Flan-T5 arms: eight tiny T5 experts per seed (full fine-tunes; LoRA adapters merged into full deltas), then
# the seed's sweep (individual, simple average, task arithmetic, SMILE over the (gate_k, k) grid).
for arm in t5_full t5_lora; do
    [[ " $ARMS " == *" $arm "* ]] || continue
    finetune=projects/smile/configs/tiny_finetune_t5.yaml
    [ "$arm" = t5_lora ] && finetune=projects/smile/configs/tiny_finetune_t5_lora.yaml
    for seed in $SEEDS; do
        $PY -m projects.smile.finetune_t5 --config $finetune seed=$seed out=$OUT/$arm/experts/seed_$seed
        $PY -m projects.smile.sweep --config projects/smile/configs/tiny_sweep_$arm.yaml \
            seed=$seed expert_root=$OUT/$arm/experts/seed_$seed out=$OUT/$arm/seed_$seed
        # where SMILE (gate_k 4, k -1) routes each task's validation sources (analyze.py: t5_routing_table)
        if [ "$arm" = t5_full ]; then
            $PY -m projects.smile.main method=smile_upscaling/smile_upscaling \
                method.gate_k=4 method.k=-1 modelpool=Seq2SeqLMPool/tiny_t5_text8 \
                modelpool.expert_root=$OUT/$arm/experts/seed_$seed \
                taskpool=FlanT5GLUETextGenerationTaskPool/tiny_t5_text8 taskpool.split=validation \
                +taskpool.routing=20 experiment=tiny_t5_full_routing seed=$seed \
                report_save_path=$OUT/$arm/routing/seed_${seed}_gate_k=4_k=-1.json
        fi
    done
done
# Mistral arm: math and code experts of the tiny Mistral, SMILE over k (gate_k=4), lm-eval bits per byte.
for seed in $SEEDS; do
    [[ " $ARMS " == *" mistral "* ]] || continue
    $PY -m projects.smile.finetune_lm --config projects/smile/configs/tiny_finetune_lm.yaml \
        seed=$seed out=$OUT/lm_experts/seed_$seed
    LM=(modelpool=AutoModelForCausalLMPool/tiny_mistral modelpool.expert_root=$OUT/lm_experts/seed_$seed
        taskpool=LMEvalTaskPool/tiny_lm_domains seed=$seed)
    RUNS=$OUT/mistral/seed_$seed
    $PY -m projects.smile.main method=dummy "${LM[@]}" 'modelpool.models=[{name: _pretrained_, path: "tiny:mistral"}]' \
        experiment=tiny_mistral run_dir=$RUNS/M0
    for e in math code; do
        $PY -m projects.smile.main method=dummy "${LM[@]}" "modelpool.models=[{name: $e, path: '{expert_root}/$e'}]" \
            experiment=tiny_mistral run_dir=$RUNS/M_$e
    done
    for k in 4 16 64; do
        for v in math code both; do
            models='[{name: _pretrained_, path: "tiny:mistral"}, {name: math, path: "{expert_root}/math"}, {name: code, path: "{expert_root}/code"}]'
            [ "$v" = both ] || models="[{name: _pretrained_, path: \"tiny:mistral\"}, {name: $v, path: \"{expert_root}/$v\"}]"
            $PY -m projects.smile.main method=smile_upscaling/smile_mistral_upscaling method.rank_of_router=4 \
                method.rank_of_expert=$k "${LM[@]}" "modelpool.models=$models" \
                experiment=tiny_mistral run_dir=$RUNS/smile_${v}_k$k
        done
    done
done
# SmolLM2 arm: math and code LoRA-16 experts of the real SmolLM2-135M, merged into full deltas by the pool;
# the base, each expert, SMILE over both for k in {8, 32, 128} (gate_k=8, top-1) and their simple average;
# lm-eval bits per byte.
for seed in $SEEDS; do
    [[ " $ARMS " == *" smollm2 "* ]] || continue
    EXPERTS=$OUT/smollm2/experts/seed_$seed
    $PY -m projects.smile.finetune_lm --config projects/smile/configs/tiny_finetune_lm_smollm2.yaml \
        seed=$seed out=$EXPERTS
    LM=(modelpool=AutoModelForCausalLMPool/smollm2_lora modelpool.expert_root=$EXPERTS
        taskpool=LMEvalTaskPool/smollm2_domains seed=$seed experiment=tiny_smollm2)
    RUNS=$OUT/smollm2/seed_$seed
    $PY -m projects.smile.main method=dummy "${LM[@]}" 'modelpool.models=[{name: _pretrained_, path: "real:smollm2-135m"}]' \
        run_dir=$RUNS/M0
    for e in math code; do  # one adapter merged into the base: task arithmetic with λ = 1 is the expert itself
        $PY -m projects.smile.main method=task_arithmetic method.scaling_factor=1.0 "${LM[@]}" \
            "modelpool.models=[{name: _pretrained_, path: 'real:smollm2-135m'}, {name: $e, path: '{expert_root}/$e'}]" \
            run_dir=$RUNS/M_$e
    done
    for k in 8 32 128; do
        $PY -m projects.smile.main method=smile_upscaling/smile_mistral_upscaling method.rank_of_router=8 \
            method.rank_of_expert=$k "${LM[@]}" run_dir=$RUNS/smile_both_k$k
    done
    $PY -m projects.smile.main method=simple_average "${LM[@]}" run_dir=$RUNS/simple_average  # the merging baseline
done
$PY -m projects.smile.analyze runs=$OUT out=$OUT/table
