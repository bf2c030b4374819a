# Two commands matter: `make demo` (the whole pipeline on the embedded default) and `make test`.
PY      := .venv/bin/python
RUN     ?= runs/mnist5k
ARGS    ?=
EVAL_ARGS ?=

.PHONY: setup demo teacher distill evaluate bench bench-eval bench-delt test clean

# The virtual environment is rebuilt whenever requirements.txt changes.
.venv/done: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements.txt
	touch $@

setup: .venv/done

teacher: setup
	$(PY) 01_train_teacher.py --run $(RUN) $(ARGS)

# 02: one distilled set per method (IPC 50 as 5 stages of 10); finished stages are skipped on rerun
METHODS ?= random dit lgd acs delt
distill: teacher
	for m in $(METHODS); do $(PY) 02_distill_stages.py --run $(RUN) --method $$m || exit 1; done

# 03: evaluates every set under $(RUN)/distilled with the random and full-data baselines
evaluate: distill
	$(PY) 03_evaluate.py --run $(RUN) $(EVAL_ARGS)

# the main job: every script in order on the embedded MNIST digits
demo: teacher distill evaluate

# timings and method checks of 02 measured in one run (fresh sets under runs/bench02)
bench: setup
	$(PY) benchmarks/bench_02.py --run $(RUN)

# wall time of one method at IPC 50, 3 convnet-3 seeds, hard labels (copies $(RUN)'s teacher to a temp folder)
bench-eval: setup
	$(PY) benchmarks/bench_03.py --run $(RUN)

# DELT EarlyLate vs the constant schedule at IPC 50 (~15 min on 2 cores; reads $(RUN), writes /tmp/bench_delt)
bench-delt: setup
	$(PY) benchmarks/bench_delt.py --run $(RUN)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
