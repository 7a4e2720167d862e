# Two commands do everything on a fresh machine:  make demo   and   make test
PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
DATA    := data
RUNS    := runs/demo
PRETRAINED := $(RUNS)/pretrain/checkpoint/meta.json
THREADS ?= 2
# stage banners with the time each took (engine/progress_stage.py); demo has 7 stages, paper 5
T0      := $(shell date +%s)
STAGE    = $(PY) -m engine.progress_stage
N       := $(if $(filter paper,$(MAKECMDGOALS)),5,7)

.PHONY: setup test demo data paper clean gpu-check

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv .venv
	# the CPU wheel first, so nothing below pulls a multi-GB CUDA build of torch
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e ".[test,triton]"
	rm -f .venv/.installed-*
	touch $@

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q tests

data: setup
	$(STAGE) 1/$(N) "prepare data: extract EN/ZH pairs, tokenizer, shards" -- \
	    $(PY) runners/prepare_data.py --data.dir $(DATA)

# the pretrained LM (shared by demo and paper; kept until make clean): a 2-stage 1F1B
# pipeline, one process per core. meta.json is written last, so a killed run is redone.
$(PRETRAINED): | data
	$(STAGE) 2/$(N) "pretrain the LM (2-stage 1F1B pipeline, 2 processes)" -- \
	    env OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 runners/pretrain.py \
	    --config configs/demo_pretrain.json --parallel.pp 2 \
	    --data.dir $(DATA) --train.out_dir $(RUNS)/pretrain --train.threads 1

# the translation teacher (stage 3 of make demo; make paper's base)
TEACHER := $(RUNS)/translate/checkpoint/meta.json
TRANSLATE = $(STAGE) 3/$(N) "fine-tune the teacher on translation" -- \
	    $(PY) runners/pretrain.py --config configs/demo_translate.json --force \
	    --data.dir $(DATA) --train.out_dir $(RUNS)/translate --train.threads $(THREADS) \
	    --train.init_from $(RUNS)/pretrain/checkpoint

demo: data $(PRETRAINED)
	$(TRANSLATE)
	$(STAGE) 4/7 "evaluate the teacher (BLEU, chrF, losses, speed)" -- \
	    $(PY) runners/evaluate.py --eval.checkpoint $(RUNS)/translate/checkpoint \
	    --eval.name teacher --data.dir $(DATA) --eval.input $(DATA)/pairs/test.tsv \
	    --eval.out_dir $(RUNS)/eval --eval.save_hyps $(RUNS)/eval/hyps.tsv
	# compression: prune the teacher to 50% of its non-embedding weights, then distil.
	# Depth (3 of 6 whole layers, ranked by the loss without each): batch-1 decode pays
	# per layer, so this student decodes in <= 0.6x the teacher's time, where 4 layers at
	# hidden 192 took 0.63x for about the same chrF (README, "Compression")
	$(STAGE) 5/7 "prune the teacher into the student" -- \
	    $(PY) runners/prune.py --prune.teacher $(RUNS)/translate/checkpoint --data.dir $(DATA) \
	    --prune.out_dir $(RUNS)/student/pruned --prune.method activation \
	    --prune.layer_metric loss --data.task translation --prune.seq_len 48 \
	    --prune.layers 3 --prune.threads $(THREADS)
	$(STAGE) 6/7 "distil the teacher into the student" -- \
	    $(PY) runners/distill.py --distill.teacher $(RUNS)/translate/checkpoint --force \
	    --distill.student $(RUNS)/student/pruned --config configs/demo_distill.json \
	    --data.dir $(DATA) --train.out_dir $(RUNS)/student/kd --train.threads $(THREADS)
	$(STAGE) 7/7 "evaluate the student" -- \
	    $(PY) runners/evaluate.py --eval.checkpoint $(RUNS)/student/kd/checkpoint \
	    --eval.name student --data.dir $(DATA) --eval.input $(DATA)/pairs/test.tsv \
	    --eval.out_dir $(RUNS)/eval_student --eval.save_hyps $(RUNS)/eval_student/hyps.tsv
	@echo; echo "teacher vs student (held-out catalogues: wget, tar, sed, grep)"
	@cat $(RUNS)/eval/eval.md; tail -n 1 $(RUNS)/eval_student/eval.md
	@echo; echo "ten held-out examples, seeded (engine/recipe/reports/examples.py)"
	@$(PY) -m engine.recipe.reports.examples teacher=$(RUNS)/eval/hyps.tsv \
	    student=$(RUNS)/eval_student/hyps.tsv
	@$(STAGE) --since $(T0) "make demo"

# the paper's tables and figures (reports/*.md, *.png) regenerated at small scale
# (the fine-tuning, compression and distillation runs start from make demo's teacher,
# trained first if make demo has not run; kept until make clean, like the pretrained LM)
# --resume: a re-run continues a failed or interrupted one (make clean starts over)
$(TEACHER): | $(PRETRAINED)
	$(TRANSLATE)

paper: data $(PRETRAINED) $(TEACHER)
	$(STAGE) 4/5 "install the plotting extra" -- sh -c '.venv/bin/pip install -q -e ".[report]" \
	    || echo "matplotlib unavailable: tables only"'
	$(STAGE) 5/5 "the paper's tables and figures (fine-tune, compress, distil runs)" -- \
	    $(PY) runners/report.py --report.out_dir reports --report.work_dir runs/paper \
	    --report.threads $(THREADS) --report.base $(RUNS)/translate/checkpoint --resume
	@$(STAGE) --since $(T0) "make paper"

# one CUDA GPU, the machine's own python3 (nothing installed): kernels vs references,
# kernel timings, base-preset training triton vs torch, the NCCL path; <= 8 minutes
gpu-check:
	PYTHONPATH=. python3 runners/gpu_check.py --gpu_check.out_dir runs/gpu_check

clean:
	rm -rf $(RUNS) runs/paper reports .pytest_cache

# every Triton kernel compiled ahead of time for sm_80 and sm_90 with the launchers' tiles:
# shared memory, registers / spills, tensor cores (no GPU needed; ~20-40 CPU-minutes)
.PHONY: check-kernels
check-kernels: setup
	$(PY) runners/check_kernels.py
