# Thin wrapper around CMake. `make run` and `make test` install what is missing first.
BUILD      ?= build
BUILD_ASAN ?= build-asan
CONF       ?= conf/luahub.conf
JOBS       ?= $(shell nproc)

.PHONY: all deps build build-asan run test test-unit test-asan check clean bench

all: build

deps:
	@bash scripts/install-deps.sh

# Quiet builds: compiler warnings and errors only (the suites print the rest).
QUIET = -- --no-print-directory -s

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHUB_WERROR=ON \
		-DCMAKE_RULE_MESSAGES=OFF -DCMAKE_TARGET_MESSAGES=OFF >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) $(QUIET)

build-asan: deps
	@cmake -S . -B $(BUILD_ASAN) -DCMAKE_BUILD_TYPE=Debug -DHUB_ASAN=ON -DHUB_UBSAN=ON \
		-DHUB_WERROR=ON -DCMAKE_RULE_MESSAGES=OFF -DCMAKE_TARGET_MESSAGES=OFF >/dev/null
	@cmake --build $(BUILD_ASAN) -j $(JOBS) $(QUIET)

# `make run` builds the hub alone (not the suites) and runs it.
run: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHUB_WERROR=ON \
		-DCMAKE_RULE_MESSAGES=OFF -DCMAKE_TARGET_MESSAGES=OFF >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) --target luahub $(QUIET)
	@./$(BUILD)/luahub -c $(CONF)

check: build
	./$(BUILD)/luahub -c $(CONF) --check

# The whole suite: the C suites twice (the release build, then the ASan+UBSan
# build), then the JavaScript suites (luahub.js in node and Debian's chromium)
# against the release binary. Fails if any of them fails.
test: build build-asan
	@rc=0; bash scripts/run-tests.sh $(BUILD) $(BUILD_ASAN) || rc=1; \
	bash tests/js/run.sh $(BUILD)/luahub || rc=1; exit $$rc

# The long part of the fault suite (tests/fault/README.md), release build:
# the Redis faults three times in one run, 50,000 connection cycles with the
# hub's RSS and descriptors before and after, valgrind after 2,000 cycles.
# Prints one "[fault] ..." line per scenario; fails if any does.
.PHONY: soak
soak: build
	@LUAHUB_BIN=$(CURDIR)/$(BUILD)/luahub LUAHUB_SRC=$(CURDIR) CK_DEFAULT_TIMEOUT=600 \
		./$(BUILD)/tests/test_fault soak

clean:
	rm -rf $(BUILD) $(BUILD_ASAN)
