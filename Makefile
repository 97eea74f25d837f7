# Runbus: `make demo` and `make test` do all set-up on a fresh machine (Python 3.10+, Java 17, Maven).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The test broker has its own port and state folder so `make test` never stops a broker
# started with `make kafka-up`. KAFKA_SECURE=1 make kafka-up|kafka-down|kafka-logs: the secured
# broker (SASL_SSL, SCRAM users, ACLs; see kafka/kafka.sh) on port 9096, state kafka/.state-secure.
KAFKA_SECURE    ?= 0
ifeq ($(KAFKA_SECURE),1)
KAFKA_PORT      ?= 9096
endif
KAFKA_PORT      ?= 9092
TEST_KAFKA_PORT ?= 19092
TEST_KAFKA_ENV  := RUNBUS_KAFKA_PORT=$(TEST_KAFKA_PORT) RUNBUS_KAFKA_CONTROLLER_PORT=19093 \
                   RUNBUS_KAFKA_STATE=$(CURDIR)/kafka/.state-test
# The secured test broker (tests/secure_kafka_support.py): one for the whole run, shared by every
# pytest-xdist worker, booted beside the plain one (a test process started without it boots its own).
TEST_SECURE_PORT  ?= 19096
TEST_SECURE_STATE := $(CURDIR)/kafka/.state-test/secure-shared
TEST_SECURE_ENV   := RUNBUS_KAFKA_SECURE=1 RUNBUS_KAFKA_PORT=$(TEST_SECURE_PORT) RUNBUS_KAFKA_CONTROLLER_PORT=19097 \
                     RUNBUS_KAFKA_STATE=$(TEST_SECURE_STATE)
PYTEST_ARGS     ?=
# Test processes (pytest-xdist): most tests wait on subprocesses and brokers, so more than the cores.
# --dist loadgroup: a module's tests that share a costly session/module fixture (a secured broker,
# a seeded UI and its Chromium) run in one worker (@pytest.mark.xdist_group).
PYTEST_WORKERS  ?= 3
PYTEST_XDIST    := $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadgroup)
BENCH_ARGS      ?=

.PHONY: install demo test test-brokers-down lint browser bench kafka-up kafka-down kafka-logs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python examples/quickstart.py
	$(BIN)/runbus runs

lint: install
	$(BIN)/ruff check .

# The UI tests drive Debian's chromium (Playwright uses this system browser; it never downloads one).
browser:
	@test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)

# The test brokers boot in the background while the venv installs; the second `up` waits for the
# plain one (kafka.sh holds its state folder's lock while starting) and says why when it did not
# start. The secured one may still be booting when the tests start: its tests wait for it the same
# way (most run late: tests/conftest.py starts the slow folders first).
test:
	@mkdir -p kafka/.state-test $(TEST_SECURE_STATE)
	@($(TEST_KAFKA_ENV) bash kafka/kafka.sh up >kafka/.state-test/up.log 2>&1 &)
	@($(TEST_SECURE_ENV) bash kafka/kafka.sh up >$(TEST_SECURE_STATE)/up.log 2>&1 &)
	@$(MAKE) --no-print-directory install lint browser || { $(MAKE) --no-print-directory test-brokers-down; exit 1; }
	@$(TEST_KAFKA_ENV) bash kafka/kafka.sh up || echo "make test: the Kafka broker did not start; Kafka tests will fail"
	@$(TEST_KAFKA_ENV) RUNBUS_REQUIRE_KAFKA=1 RUNBUS_TEST_KAFKA=127.0.0.1:$(TEST_KAFKA_PORT) \
	  RUNBUS_TEST_KAFKA_SECURE=127.0.0.1:$(TEST_SECURE_PORT) RUNBUS_TEST_KAFKA_SECURE_STATE=$(TEST_SECURE_STATE) \
	  $(BIN)/pytest $(PYTEST_XDIST) $(PYTEST_ARGS); \
	  status=$$?; $(MAKE) --no-print-directory test-brokers-down; exit $$status

test-brokers-down:
	@$(TEST_KAFKA_ENV) bash kafka/kafka.sh down
	@$(TEST_SECURE_ENV) bash kafka/kafka.sh down

bench: install
	@$(TEST_KAFKA_ENV) bash kafka/kafka.sh up
	@RUNBUS_BENCH_KAFKA=127.0.0.1:$(TEST_KAFKA_PORT) $(BIN)/python -m benchmarks $(BENCH_ARGS); \
	  status=$$?; $(TEST_KAFKA_ENV) bash kafka/kafka.sh down; exit $$status

# kafka-up keeps the broker's data across down/up; the test broker starts empty every time.
kafka-up:
	RUNBUS_KAFKA_SECURE=$(KAFKA_SECURE) RUNBUS_KAFKA_KEEP_DATA=1 RUNBUS_KAFKA_PORT=$(KAFKA_PORT) bash kafka/kafka.sh up

kafka-down:
	RUNBUS_KAFKA_SECURE=$(KAFKA_SECURE) RUNBUS_KAFKA_PORT=$(KAFKA_PORT) bash kafka/kafka.sh down

kafka-logs:
	RUNBUS_KAFKA_SECURE=$(KAFKA_SECURE) bash kafka/kafka.sh logs

clean:
	rm -rf $(VENV) .runbus kafka/.state kafka/.state-test kafka/.state-secure kafka/.state-test-secure
