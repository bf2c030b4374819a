# Two commands matter: `make demo` (the whole pipeline on the embedded default) and `make test`.
PY      := .venv/bin/python
RUN     ?= runs/mnist5k
ARGS    ?=
# the demo's table puts every method under hard labels (03's default gives DELT its own soft
# protocol, which adds soft-label rows) and keeps the analyses to the redundancy of dit and lgd
# and the diversity (03's default adds per-stage accuracy and acs): ~40 fewer minutes on 2 CPU
# cores. EVAL_ARGS= restores 03's defaults.
EVAL_ARGS ?= --soft-methods none --analyses redundancy,diversity --analysis-methods dit,lgd

.PHONY: setup demo teacher distill ablation evaluate timings bench bench-speed bench-gpu \
	test notebooks clean report

# The virtual environment is rebuilt whenever requirements.txt changes.
.venv/done: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements.txt
	touch $@

setup: .venv/done

# 01: the teacher, the DiT prior (a VAE + latent DiT) with its distillability, and IGD's surrogate
# trajectory (--surrogate: igd needs it)
teacher: setup
	$(PY) 01_train_teacher.py --run $(RUN) --surrogate --distillability $(ARGS)

# 02: one distilled set per method and IPC (5 stages of IPC/5); finished stages are skipped on rerun
METHODS ?= random dit lgd acs igd delt
IPCS    ?= 10 50
distill: teacher
	for i in $(IPCS); do for m in $(METHODS); do \
	  $(PY) 02_distill_stages.py --run $(RUN) --method $$m --ipc $$i || exit 1; done; done

# the LGD ablation with the learnability term off (--current-weight 0: teacher guidance alone,
# -omega CE(f_ref)), beside the main sets but outside distilled/, so 03 keeps it out of its analyses
ablation: distill
	for i in $(IPCS); do $(PY) 02_distill_stages.py --run $(RUN) --method lgd --ipc $$i \
	  --current-weight 0 --out $(RUN)/ablations/lgd-teacher-ipc$$i || exit 1; done

# 03: evaluates every set under $(RUN)/distilled with the random and full-data baselines, then the
# ablation under the same protocol (<run>/eval/ablations; its students share 03's cache)
evaluate: distill ablation
	$(PY) 03_evaluate.py --run $(RUN) $(EVAL_ARGS)
	$(PY) 03_evaluate.py --run $(RUN) --name ablations --baselines none --analyses none \
	  $(foreach i,$(IPCS),$(RUN)/ablations/lgd-teacher-ipc$(i))

# the main job: every script in order on the embedded MNIST digits, where its time went, and the
# report of its numbers (docs/results.md and the README's results table)
demo: teacher distill evaluate
	@$(MAKE) --no-print-directory timings RUN=$(RUN)
	@$(MAKE) --no-print-directory report RUN=$(RUN)

# the wall time of every phase the scripts recorded in $(RUN)/timings.json, with the total
# (no setup prerequisite: it only reads a file, and must not rebuild the environment)
timings:
	@$(PY) -c "import common; common.print_timings('$(RUN)')"

# docs/results.md (every table, generated from $(RUN)'s JSON files) and the README's results table
report:
	$(PY) report.py --run $(RUN)

# sampling and student training against the reference loops and this machine's peak, and each
# model's step in fp32 and under bf16 autocast (~5 min; random models if $(RUN) is unfinished)
bench: bench-speed

bench-speed: setup
	$(PY) benchmarks/bench_speed.py --run $(RUN)

# paper-scale guided sampling on one GPU: DiT-XL/2 and an sd-vae-ft-mse-shaped VAE, random weights
# (nothing downloaded), plain vs LGD-guided, checkpointing, bf16 vs fp32, against the one-image
# fp32 loop; FLOP/s against the bf16 peak; projected LGD wall times (writes runs/bench_gpu.json).
# On a CPU: ARGS=--tiny; the memory and FLOPs per guided sample alone: ARGS=--estimate-only
bench-gpu: setup
	$(PY) benchmarks/bench_gpu.py $(ARGS)

# the tests and every notebook top to bottom at the ci scale (a tiny run built in runs/nb-ci), in
# one session: two pytest-xdist workers share the 2 cores, one thread per process (which also lets
# tests/forkrun.py run each script in a fork of its worker, imports done), a whole file per worker
# (a module's fixtures are built once; xdist hands out the files with the most tests first), the
# first notebook to need the shared ci run builds it while the others wait; the 25 slowest steps
# at the end
test: setup
	OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 DD_NB_SCALE=ci $(PY) -m pytest -q -n 2 \
	  --dist loadfile --durations=25 --nbval-lax --nbval-current-env \
	  --nbval-cell-timeout=900 tests notebooks

# re-execute the notebooks at the small scale on $(RUN) (after `make demo`), saved with outputs
NOTEBOOKS ?= $(wildcard notebooks/*.ipynb)
notebooks: setup
	for n in $(NOTEBOOKS); do DD_RUN=$(abspath $(RUN)) $(PY) -m jupyter nbconvert --to notebook \
	  --execute \
	  --inplace --ExecutePreprocessor.timeout=7200 $$n || exit 1; done

clean:
	rm -rf runs .pytest_cache
