# Two commands matter: `make demo` (the whole pipeline on the embedded default) and `make test`.
PY      := .venv/bin/python
RUN     ?= runs/mnist5k
ARGS    ?=
EVAL_ARGS ?=

.PHONY: setup demo teacher evaluate bench-eval test clean

# The virtual environment is rebuilt whenever requirements.txt changes.
.venv/done: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements.txt
	touch $@

setup: .venv/done

teacher: setup
	$(PY) 01_train_teacher.py --run $(RUN) $(ARGS)

# evaluates every set under $(RUN)/distilled (only the baselines while there is none)
evaluate: teacher
	$(PY) 03_evaluate.py --run $(RUN) $(EVAL_ARGS)

# wall time of one method at IPC 50, 3 convnet-3 seeds, hard labels (copies $(RUN)'s teacher to a temp folder)
bench-eval: setup
	$(PY) tests/bench_eval.py --run $(RUN)

# the main job: every script in order on the embedded MNIST digits (02 joins as it lands)
demo: teacher evaluate

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
