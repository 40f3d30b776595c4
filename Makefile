# Thin wrapper around CMake. `make run` and `make test` install what is missing first.
BUILD      ?= build
BUILD_ASAN ?= build-asan
BUILD_FUZZ ?= build-fuzz
FUZZ_SECONDS ?= 120
FUZZ_TARGETS ?=
CONF       ?= conf/luahub.conf
JOBS       ?= $(shell nproc)

.PHONY: all deps build build-asan build-fuzz fuzz run test test-unit test-asan check clean bench

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

# The libFuzzer targets (tests/fuzz/README.md): clang, ASan+UBSan, coverage
# instrumentation; the libraries and the targets only.
build-fuzz: deps
	@cmake -S . -B $(BUILD_FUZZ) -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Debug \
		-DHUB_FUZZ=ON -DHUB_TESTS=OFF -DHUB_WERROR=ON \
		-DCMAKE_RULE_MESSAGES=OFF -DCMAKE_TARGET_MESSAGES=OFF >/dev/null
	@cmake --build $(BUILD_FUZZ) -j $(JOBS) $(QUIET)

# Fuzzes each target FUZZ_SECONDS (default 120), one after the other, and
# prints executions and coverage per target. FUZZ_TARGETS="proto http" picks.
fuzz: build-fuzz
	@bash scripts/fuzz.sh $(BUILD_FUZZ) $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# `make run` builds the hub alone (not the suites) and runs it.
run: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHUB_WERROR=ON \
		-DCMAKE_RULE_MESSAGES=OFF -DCMAKE_TARGET_MESSAGES=OFF >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) --target luahub $(QUIET)
	@./$(BUILD)/luahub -c $(CONF)

check: build
	./$(BUILD)/luahub -c $(CONF) --check

# The whole suite: the C suites twice (the release build, then the ASan+UBSan
# build), each fuzz target once over its seed corpus (the fuzz build: no
# fuzzing, seconds), then the JavaScript suites (luahub.js in node and
# Debian's chromium) against the release binary. Fails if any of them fails.
test: build build-asan build-fuzz
	@rc=0; bash scripts/run-tests.sh $(BUILD) $(BUILD_ASAN) $(BUILD_FUZZ) || rc=1; \
	bash tests/js/run.sh $(BUILD)/luahub || rc=1; exit $$rc

clean:
	rm -rf $(BUILD) $(BUILD_ASAN) $(BUILD_FUZZ)
