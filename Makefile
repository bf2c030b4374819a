# Two commands matter: `make demo` (the whole pipeline on the embedded default) and `make test`.
PY      := .venv/bin/python
RUN     ?= runs/mnist5k
ARGS    ?=

.PHONY: setup demo teacher test clean bench-delt

# The virtual environment is rebuilt whenever requirements.txt changes.
.venv/done: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements.txt
	touch $@

setup: .venv/done

teacher: setup
	$(PY) 01_train_teacher.py --run $(RUN) $(ARGS)

# the main job: every script in order on the embedded MNIST digits (02 and 03 join as they land)
demo: teacher
	$(PY) 02_distill_stages.py --method delt --run $(RUN)

# DELT EarlyLate vs the constant schedule at IPC 50 (~15 min on 2 cores; reads $(RUN), writes /tmp/bench_delt)
bench-delt: setup
	nice -n 10 $(PY) benchmarks/bench_delt.py --run $(RUN) $(ARGS)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
