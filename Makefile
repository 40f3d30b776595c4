# Thin wrapper around CMake. `make run` and `make test` install what is missing first.
BUILD      ?= build
BUILD_ASAN ?= build-asan
CONF       ?= conf/luahub.conf
JOBS       ?= $(shell nproc)

.PHONY: all deps build build-asan run test test-unit test-asan check clean bench

all: build

deps:
	@bash scripts/install-deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHUB_WERROR=ON >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

build-asan: deps
	@cmake -S . -B $(BUILD_ASAN) -DCMAKE_BUILD_TYPE=Debug -DHUB_ASAN=ON -DHUB_UBSAN=ON -DHUB_WERROR=ON >/dev/null
	@cmake --build $(BUILD_ASAN) -j $(JOBS)

run: build
	./$(BUILD)/luahub -c $(CONF)

check: build
	./$(BUILD)/luahub -c $(CONF) --check

# The whole suite, twice: the release build, then the ASan+UBSan build.
test: build build-asan
	@bash scripts/run-tests.sh $(BUILD) $(BUILD_ASAN)

clean:
	rm -rf $(BUILD) $(BUILD_ASAN)
